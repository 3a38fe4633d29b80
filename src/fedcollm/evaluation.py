"""Multiple-choice accuracy as lm-evaluation-harness computes it.

Each choice is scored by the summed log-likelihood of its continuation `" " + choice` after
the prompt (acc), and by that sum divided by the choice's length in characters (acc_norm).
The prompt is run once per question and its key/value cache shared by all of its choices;
questions whose prompts have the same token length are batched together, so there is no
padding in the prompt pass and the choices are right-padded after it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.data import Example, collate, encode_continuations
from fedcollm.tasks import TARGET_DELIMITER, Question


@dataclass
class Accuracy:
    acc: float
    acc_norm: float
    n: int
    predictions: list[int]
    predictions_norm: list[int]

    def summary(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def _score_group(model, contexts: list[list[int]], choices: list[list[list[int]]], pad_id: int):
    """Summed log-probabilities of the choices of questions whose contexts have one length.

    contexts: B context token lists of one length L; choices: B lists of n token lists.
    Returns B lists of n floats."""
    n = len(choices[0])
    context = torch.tensor(contexts)  # (B, L)
    out = model(input_ids=context, use_cache=True, logits_to_keep=1)
    # The context's last position predicts every choice's first token.
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n, 0)  # (B*n, V)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    # Every choice token is scored: right-padded like any batch, all of it "answer".
    batch = collate([Example(c, [True] * len(c)) for q in choices for c in q], pad_id)
    ids, real = batch.input_ids, batch.answer_mask
    attention = torch.cat([torch.ones(len(ids), context.shape[1], dtype=torch.long), real], 1)
    logits = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits
    # Position j of a choice predicts its token j+1.
    rest = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    totals = first.gather(-1, ids[:, :1])[:, 0].double()
    totals += (rest.double() * real[:, 1:]).sum(1)
    return totals.view(len(choices), n).tolist()


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
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (context, answers) in enumerate(encoded):
        groups[len(context), len(answers)].append(index)
    scores: list[list[float]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            results = _score_group(
                model,
                [encoded[i][0] for i in chunk],
                [encoded[i][1] for i in chunk],
                tokenizer.pad_token_id,
            )
            for i, result in zip(chunk, results, strict=True):
                scores[i] = result
    model.train(was_training)
    return scores


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
