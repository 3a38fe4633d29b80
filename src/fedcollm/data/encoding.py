"""Tokenisation as lm-evaluation-harness does it: the prompt and its continuation, for
training (the correct answer) and for scoring (every choice)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedcollm.config import Config
from fedcollm.data.rows import DataError
from fedcollm.data.tasks import Question


@dataclass
class Example:
    """One tokenised (context, continuation) pair; `answer_mask` marks continuation tokens."""

    input_ids: list[int]
    answer_mask: list[bool]


Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def prefix_token_id(tokenizer) -> int:
    """What lm-eval reads in place of an empty context: BOS, or EOS where there is none."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """Text as lm-eval's `tok_encode` encodes it: with the tokenizer's own special tokens (a
    BOS for Llama or Gemma, nothing for Qwen or GPT-2), unless the text already opens with
    the prefix token's text."""
    if text.startswith(tokenizer.decode([prefix_token_id(tokenizer)])):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_continuations(tokenizer, context: str, continuations: Sequence[str]) -> list[Pair]:
    """Each (context, continuation) pair tokenised as lm-evaluation-harness does, uncut.

    A continuation's tokens are the whole text's tokens after as many tokens as the context
    alone encodes to, and the model reads the context's own tokens followed by those;
    trailing spaces of the context move to the continuation. An empty context is the prefix
    token (or the continuation's first token, where that is the prefix token)."""
    if not context:
        prefix, pairs = prefix_token_id(tokenizer), []
        for continuation in continuations:
            ids = tokenizer.encode(continuation, add_special_tokens=False)
            pairs.append((ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids))
        return pairs
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuations = context[:-spaces], [context[-spaces:] + c for c in continuations]
    context_ids = prompt_tokens(tokenizer, context)
    return [
        (context_ids, prompt_tokens(tokenizer, context + c)[len(context_ids) :])
        for c in continuations
    ]


def encode_pair(
    tokenizer, context: str, continuation: str, max_length: int, end: bool = False
) -> Example:
    """One (context, continuation) pair as a training example, cut from the left to at most
    `max_length` tokens; see `encode_continuations`. With `end`, the continuation closes
    with the tokenizer's end-of-sequence token, which is then a target too."""
    ((context_ids, answer_ids),) = encode_continuations(tokenizer, context, [continuation])
    if end and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    ids = (context_ids + answer_ids)[-max_length:]
    mask = [False] * len(context_ids) + [True] * len(answer_ids)
    return Example(input_ids=ids, answer_mask=mask[-len(ids) :])


def encode_answer(tokenizer, question: Question, max_length: int, end: bool = False) -> Example:
    """A question's prompt followed by its correct answer (and EOS with `end`)."""
    return encode_pair(tokenizer, question.context, question.continuation, max_length, end)


def as_prompted(questions: Sequence[Question], tokenizer, prompt_format: str) -> list[Question]:
    """The questions as the model reads them: the prompt as lm-eval builds it ("plain"), or
    ("chat") that prompt as the user's turn of the tokenizer's chat template, the answer
    right after the assistant's turn opens (no delimiter)."""
    if prompt_format == "plain":
        return list(questions)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            'data.prompt_format = "chat": this tokenizer has no chat template; use "plain"'
        )
    return [
        replace(
            q,
            context=tokenizer.apply_chat_template(
                [{"role": "user", "content": q.context}], tokenize=False, add_generation_prompt=True
            ),
            delimiter="",
        )
        for q in questions
    ]


def encode_examples(
    questions: Sequence[Question], indices: Sequence[int], tokenizer, config: Config
) -> list[Example]:
    """The training examples of the questions at `indices` (a client's D_k, or D_a). A
    generative answer ends with EOS, the SFT convention, so that a model learns where an
    answer stops; a choice of a multiple-choice question does not, as it is scored without
    one (scoring adds no EOS either: `target_loss` is the reference text's own loss)."""
    chosen = as_prompted([questions[i] for i in indices], tokenizer, config.data.prompt_format)
    return [encode_answer(tokenizer, q, config.data.max_length, not q.choices) for q in chosen]
