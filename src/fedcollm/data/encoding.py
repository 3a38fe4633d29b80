"""Tokenisation as lm-evaluation-harness does it: the prompt and its continuation, for
training (the correct answer) and for scoring (every choice)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcollm.config import Config
from fedcollm.data.tasks import TARGET_DELIMITER, Question


@dataclass
class Example:
    """One tokenised (context, continuation) pair; `answer_mask` marks continuation tokens."""

    input_ids: list[int]
    answer_mask: list[bool]


def encode_continuations(
    tokenizer, context: str, continuations: Sequence[str], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Tokenise as lm-evaluation-harness does: a continuation's tokens are the whole text's
    tokens after as many tokens as the context alone encodes to, and the model reads the
    context's own tokens followed by those. Trailing spaces of the context move to the
    continuation; no special tokens are added. Returns the context tokens (shared by every
    continuation; its left end cut so that the longest pair fits in `max_length`) and the
    tokens of each continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuations = context[:-spaces], [context[-spaces:] + c for c in continuations]
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    answers = [
        tokenizer.encode(context + c, add_special_tokens=False)[len(context_ids) :]
        for c in continuations
    ]
    keep = max(max_length - max(len(a) for a in answers), 1)
    return context_ids[-keep:], answers


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> Example:
    """One (context, continuation) pair as a training example; see `encode_continuations`."""
    context_ids, (answer_ids,) = encode_continuations(
        tokenizer, context, [continuation], max_length
    )
    ids = (context_ids + answer_ids)[-max_length:]
    mask = [False] * len(context_ids) + [True] * len(answer_ids)
    return Example(input_ids=ids, answer_mask=mask[-len(ids) :])


def encode_answer(tokenizer, question: Question, max_length: int) -> Example:
    """The training example of a question: its prompt followed by the correct answer."""
    return encode_pair(tokenizer, question.context, TARGET_DELIMITER + question.answer, max_length)


def encode_examples(
    questions: Sequence[Question], indices: Sequence[int], tokenizer, config: Config
) -> list[Example]:
    """The training examples of the questions at `indices` (a client's D_k, or D_a)."""
    return [encode_answer(tokenizer, questions[i], config.data.max_length) for i in indices]
