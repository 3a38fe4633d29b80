"""Generative evaluation: batched greedy decoding, and the metrics of its text.

Prompts are encoded as lm-eval encodes them, sorted longest first (as lm-eval's batches),
left-padded and decoded greedily with the key/value cache, each row until one of its task's
`until` strings, EOS or `max_gen_toks`; the text is cut before the first `until` string,
as lm-eval cuts it. Decoding is plain greedy: the model's own generation defaults (a
repetition penalty, sampling) are not applied.

Also the reference answer's mean token loss under teacher forcing, which needs no decoding
at all. The metrics of the generated text are in `text_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from fedcollm.data import Example, Question, collate, encode_answer
from fedcollm.data.encoding import prompt_tokens
from fedcollm.evaluation.multiple_choice import context_length
from fedcollm.evaluation.progress import Progress
from fedcollm.models import answer_logits, eval_mode, model_device


class _Until(StoppingCriteria):
    """Stops each row once its generated text holds one of the stop strings."""

    def __init__(self, tokenizer, until: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.until, self.start = tokenizer, [u for u in until if u], prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(u in text for u in self.until) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at(text: str, until: Sequence[str]) -> str:
    """The text before the first of the stop strings (lm-eval's post-processing)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    until: Sequence[str],
    max_gen_toks: int,
    batch_size: int = 16,
    max_length: int = 0,
) -> list[str]:
    """The greedy continuation of every prompt, cut at `until`; prompts longer than
    `max_length - max_gen_toks` tokens keep their last ones, as lm-eval cuts them (0: the
    model's context length, lm-eval's default)."""
    max_length = max_length or context_length(model, tokenizer)
    encoded = [prompt_tokens(tokenizer, p)[-(max_length - max_gen_toks) :] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(
        max_new_tokens=max_gen_toks,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    progress = Progress("generating (prompts)", len(order))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every prompt ends at the same column
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[r, width - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                generation_config=greedy,
                stopping_criteria=StoppingCriteriaList([_Until(tokenizer, until, width)]),
            )
            texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                outputs[i] = cut_at(text, until)
            progress.advance(len(rows))
    return outputs


def target_losses(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 0,
    total: bool = False,
) -> list[float]:
    """Each reference answer's mean token loss after its prompt (teacher-forced; its sum with
    `total`, a negative log-likelihood), with the pair cut from the left to `max_length`
    tokens as in training (0: the model's context length, as for every evaluation)."""
    max_length = max_length or context_length(model, tokenizer)
    examples = [encode_answer(tokenizer, q, max_length) for q in questions]
    return example_losses(model, examples, tokenizer.pad_token_id, batch_size, total)


@torch.inference_mode()
def example_losses(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 16,
    total: bool = False,
) -> list[float]:
    """Each encoded example's mean loss over its answer tokens (their sum with `total`),
    teacher-forced in eval mode."""
    losses = []
    progress = Progress("answer losses (examples)", len(examples))
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            logits, targets = answer_logits(model, collate(chunk, pad_id))
            nll = F.cross_entropy(logits.float(), targets, reduction="none").cpu()
            # answer_logits is row-major: each example's answer tokens in turn.
            for piece in torch.split(nll, [sum(e.answer_mask[1:]) for e in chunk]):
                losses.append(piece.sum().item() if total else piece.mean().item())
            progress.advance(len(chunk))
    return losses
