"""Multiple-choice accuracy as lm-evaluation-harness computes it.

Each choice is scored by the summed log-likelihood of its continuation `" " + choice` after
the prompt (acc), and by that sum divided by the choice's length in characters (acc_norm).
Each (prompt, choice) pair is cut from the left to the evaluation's `max_length` exactly as
lm-eval cuts it, which by default (the model's context length) cuts nothing.

Each question is one row: its prompt once, then all of its choices, with an attention mask
that lets every choice see the prompt and itself but not the other choices, and positions
that restart after the prompt for each choice. So the prompt is computed once, the model runs
once per batch, and only the positions that predict a choice token reach the output layer.
A question whose choices see different prompts once cut (a prompt near `max_length`, or an
empty one) is scored one row per choice instead. Rows are sorted by packed length before
batching, to keep padding small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.data import DataError, Question, encode_continuations
from fedcollm.data.encoding import Pair
from fedcollm.evaluation.progress import Progress
from fedcollm.models import eval_mode, model_device, output_logits


@dataclass
class Accuracy:
    acc: float
    acc_norm: float
    n: int
    predictions: list[int]
    predictions_norm: list[int]

    @property
    def acc_stderr(self) -> float:
        return stderr(self.acc, self.n)

    @property
    def acc_norm_stderr(self) -> float:
        return stderr(self.acc_norm, self.n)

    def summary(self) -> dict[str, float]:
        return {
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
            "n": self.n,
        }


def stderr(accuracy: float, n: int) -> float:
    """The standard error of an accuracy over n questions, as lm-eval reports it (the
    sample standard deviation of the 0/1 scores over sqrt(n)): with 100 questions near 50%,
    0.05."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else math.nan


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


def context_length(model: torch.nn.Module, tokenizer) -> int:
    """The model's context length as lm-eval resolves it, its default `max_length`: the
    config's n_positions, max_position_embeddings or n_ctx, else the tokenizer's
    model_max_length (unless unset), else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else 2048


def _cut(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The context lm-eval feeds before a continuation: the pair's last max_length + 1
    tokens, less the last one (which predicts nothing)."""
    return (context + continuation)[-(max_length + 1) :][: -len(continuation)]


def _entries(questions: Sequence[Question], pairs: list[list[Pair]], max_length: int):
    """The packed rows to score: a question whose cut contexts are all the same is one row
    (its context once, every choice after it); otherwise each choice is a row of its own.
    Yields (question, first choice, (context, choices))."""
    for q, choices in enumerate(pairs):
        for i, (_, cont) in enumerate(choices):
            if len(cont) > max_length:  # lm-eval refuses these too
                raise DataError(
                    f"question {questions[q].id}: choice {i + 1} has {len(cont)} tokens, more "
                    f"than the evaluation's max_length {max_length}; raise eval.max_length"
                )
        contexts = [_cut(ctx, cont, max_length) for ctx, cont in choices]
        if all(c == contexts[0] for c in contexts):
            yield q, 0, (contexts[0], [cont for _, cont in choices])
        else:
            for i, (context, (_, cont)) in enumerate(zip(contexts, choices, strict=True)):
                yield q, i, (context, [cont])


@torch.inference_mode()
def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 0,
) -> list[list[float]]:
    """Summed log-probability of every choice's continuation, per question; each (context,
    choice) pair cut from the left to `max_length` tokens as lm-eval cuts it (0: the model's
    context length, lm-eval's default)."""
    max_length = max_length or context_length(model, tokenizer)
    pairs = [
        encode_continuations(tokenizer, q.context, [q.delimiter + c for c in q.choices])
        for q in questions
    ]
    entries = list(_entries(questions, pairs, max_length))
    # Rows of similar packed length share a batch, so that padding stays small.
    order = sorted(range(len(entries)), key=lambda e: _packed_length(entries[e][2]))
    scores: list[list[float]] = [[0.0] * len(q.choices) for q in questions]
    progress = Progress("scoring choices (rows)", len(order))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = [entries[e] for e in order[start : start + batch_size]]
            results = _score_packed(model, [row for _, _, row in chunk], tokenizer.pad_token_id)
            for (q, first, _), result in zip(chunk, results, strict=True):
                scores[q][first : first + len(result)] = result
            progress.advance(len(chunk))
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
    max_length: int = 0,
) -> Accuracy:
    if not questions:
        raise ValueError("no questions to evaluate")
    lls = choice_loglikelihoods(model, tokenizer, questions, batch_size, max_length)
    return accuracy(questions, lls)
