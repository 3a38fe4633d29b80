"""Multiple-choice accuracy as lm-evaluation-harness computes it.

Each choice is scored by the summed log-likelihood of its continuation `" " + choice` after
the prompt (acc), and by that sum divided by the choice's length in characters (acc_norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.data import collate, encode_pair
from fedcollm.tasks import TARGET_DELIMITER, Question
from fedcollm.training import answer_logits, answer_rows


@dataclass
class Accuracy:
    acc: float
    acc_norm: float
    n: int
    predictions: list[int]
    predictions_norm: list[int]

    def summary(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


@torch.inference_mode()
def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 256,
) -> list[list[float]]:
    """Summed log-probability of every choice's continuation, per question."""
    requests = [
        (q_index, encode_pair(tokenizer, q.context, TARGET_DELIMITER + choice, max_length))
        for q_index, q in enumerate(questions)
        for choice in q.choices
    ]
    # Longest first, so that batches hold similar lengths and little padding.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1].input_ids))
    scores = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([requests[i][1] for i in chunk], pad_id)
        logits, targets = answer_logits(model, batch)
        token_logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])
        sums = torch.zeros(len(chunk), dtype=torch.float64)
        sums.index_add_(0, answer_rows(batch), token_logprobs[:, 0].double())
        for i, total in zip(chunk, sums.tolist(), strict=True):
            scores[i] = total
    model.train(was_training)
    per_question: list[list[float]] = [[] for _ in questions]
    for (q_index, _), score in zip(requests, scores, strict=True):
        per_question[q_index].append(score)
    return per_question


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
