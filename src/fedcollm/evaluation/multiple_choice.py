"""Multiple-choice accuracy as lm-evaluation-harness computes it.

Each choice is scored by the summed log-likelihood of its continuation `" " + choice` after
the prompt (acc), and by that sum divided by the choice's length in characters (acc_norm).
Each question is one row: its prompt once, then all of its choices, with an attention mask
that lets every choice see the prompt and itself but not the other choices, and positions
that restart after the prompt for each choice. So the prompt is computed once, the model runs
once per batch, and only the positions that predict a choice token reach the output layer.
Questions are sorted by packed length before batching, to keep padding small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.config import Config
from fedcollm.data import TARGET_DELIMITER, Question, encode_continuations
from fedcollm.models import eval_mode, model_device, output_logits


@dataclass
class Accuracy:
    acc: float
    acc_norm: float
    n: int
    predictions: list[int]
    predictions_norm: list[int]

    def summary(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def _packed_batch(encoded: list[tuple[list[int], list[list[int]]]], pad_id: int, dtype):
    """One row per question: its context followed by all of its choices, each choice
    attending to the context and to itself only, positioned as if it came right after the
    context. A choice's last token predicts nothing we score, so it is not fed: questions
    whose choices are single tokens (CommonsenseQA's letters) are their context alone, and a
    batch of only those needs no more than a padding mask. Returns the model's keyword
    inputs and, for every choice token, (row, position that predicts it, token, slot)."""
    fed = [[choice[:-1] for choice in choices] for _, choices in encoded]
    rows = [
        context + [t for part in parts for t in part]
        for (context, _), parts in zip(encoded, fed, strict=True)
    ]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1)  # -1 padding, 0 context, i choice i
    targets: list[tuple[int, int, int, int]] = []
    slots = max(len(choices) for _, choices in encoded)
    for row, ((context, choices), parts) in enumerate(zip(encoded, fed, strict=True)):
        n = len(context)
        ids[row, : len(rows[row])] = torch.tensor(rows[row])
        positions[row, :n] = torch.arange(n)
        segment[row, :n] = 0
        start = n
        for i, (choice, part) in enumerate(zip(choices, parts, strict=True)):
            span = slice(start, start + len(part))
            positions[row, span] = torch.arange(n, n + len(part))
            segment[row, span] = i + 1
            # The context's last token predicts the choice's first; each token the next.
            predictors = [n - 1, *range(start, start + len(part))]
            targets += [
                (row, p, t, row * slots + i) for p, t in zip(predictors, choice, strict=True)
            ]
            start += len(part)
    inputs = {"input_ids": ids}
    if (segment > 0).any():
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = segment[:, :, None] == segment[:, None, :]
        sees = causal & (same | (segment[:, None, :] == 0)) & (segment[:, :, None] >= 0)
        sees |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no empty rows
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill(~sees, torch.finfo(dtype).min)
        inputs.update(attention_mask=mask[:, None], position_ids=positions)
    else:
        inputs["attention_mask"] = (segment >= 0).long()
    return inputs, torch.tensor(targets).T, slots


def _score_packed(model, encoded, pad_id: int) -> list[list[float]]:
    """Summed log-probabilities of every choice of a batch of questions, in one forward."""
    inputs, targets, slots = _packed_batch(encoded, pad_id, model.dtype)
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    row, predictor, token, slot = targets.to(device)
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    hidden = hidden[row, predictor]  # (N, H): only the positions that predict a choice token
    logprobs = F.log_softmax(output_logits(model, hidden).float(), dim=-1)
    picked = logprobs.gather(-1, token[:, None])[:, 0].double()
    totals = torch.zeros(len(encoded) * slots, dtype=torch.float64, device=device)
    totals = totals.index_add_(0, slot, picked).cpu()
    return [totals[q * slots : q * slots + len(c)].tolist() for q, (_, c) in enumerate(encoded)]


@torch.inference_mode()
def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 256,
) -> list[list[float]]:
    """Summed log-probability of every choice's continuation, per question."""
    encoded = [
        encode_continuations(
            tokenizer, q.context, [TARGET_DELIMITER + c for c in q.choices], max_length
        )
        for q in questions
    ]
    # Questions of similar packed length share a batch, so that padding stays small.
    order = sorted(range(len(encoded)), key=lambda i: _packed_length(encoded[i]))
    scores: list[list[float]] = [[] for _ in questions]
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            results = _score_packed(model, [encoded[i] for i in chunk], tokenizer.pad_token_id)
            for i, result in zip(chunk, results, strict=True):
                scores[i] = result
    return scores


def _packed_length(encoded: tuple[list[int], list[list[int]]]) -> int:
    context, choices = encoded
    return len(context) + sum(len(c) - 1 for c in choices)


def accuracy(questions: Sequence[Question], loglikelihoods: Sequence[Sequence[float]]) -> Accuracy:
    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    preds, preds_norm = [], []
    for q, lls in zip(questions, loglikelihoods, strict=True):
        preds.append(argmax(lls))
        preds_norm.append(argmax([ll / len(c) for ll, c in zip(lls, q.choices, strict=True)]))
    n = len(questions)
    correct = sum(p == q.gold for p, q in zip(preds, questions, strict=True))
    correct_norm = sum(p == q.gold for p, q in zip(preds_norm, questions, strict=True))
    return Accuracy(correct / n, correct_norm / n, n, preds, preds_norm)


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 256,
) -> Accuracy:
    if not questions:
        raise ValueError("no questions to evaluate")
    lls = choice_loglikelihoods(model, tokenizer, questions, batch_size, max_length)
    return accuracy(questions, lls)


def score(model, tokenizer, config: Config, questions: Sequence[Question]) -> Accuracy:
    """Multiple-choice accuracy with the config's evaluation settings."""
    return evaluate_multiple_choice(
        model, tokenizer, questions, config.eval.batch_size, config.data.max_length
    )
