"""D_a for two tokenizers: each example in both, and the answer positions where they agree.

Both models read the same text (each with its own prompt format). Position t of a model
predicts the token that starts at some point of the answer; two positions, one per model,
are aligned when the tokens they predict start at the same point, so both models predict
"the text that follows here". The point is counted in bytes from the end of the text: the
answer is the end of both texts, while their beginnings may differ (a chat template, a BOS,
SentencePiece's dummy space before the first word). Where one tokenizer starts a token and
the other does not (it is inside one of the other's tokens) there is nothing to compare:
both models still learn their own answer tokens there (cross-entropy), but not from each
other. Alignment happens once, when D_a is encoded; a batch only gathers rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedcollm.config import Config
from fedcollm.data.batches import Batch, collate
from fedcollm.data.encoding import Example, encode_examples
from fedcollm.data.tasks import Question


@dataclass
class AlignedExample:
    """One D_a example in both tokenizations; `slm_rows[i]` and `llm_rows[i]` are aligned
    answer positions, counted among each example's predicted answer positions."""

    slm: Example
    llm: Example
    slm_rows: list[int]
    llm_rows: list[int]


@dataclass
class AlignedBatch:
    """Both models' batches of the same examples; the rows of each model's answer logits
    (as `answer_logits` returns them, row-major) that are aligned, pair by pair."""

    slm: Batch
    llm: Batch
    slm_rows: torch.Tensor
    llm_rows: torch.Tensor


def predicted_answer_starts(example: Example, byte_lengths: torch.Tensor) -> list[int]:
    """For each answer token a position predicts (not one at index 0: nothing predicts it),
    where it starts, in bytes from the end of the text."""
    ids = torch.tensor(example.input_ids)
    from_end = byte_lengths[ids].flip(0).cumsum(0).flip(0)  # bytes of token j and after
    predicted = torch.tensor(example.answer_mask[1:], dtype=torch.bool)
    return from_end[1:][predicted].tolist()


def align(slm: Example, llm: Example, slm_bytes: torch.Tensor, llm_bytes: torch.Tensor):
    """The aligned answer positions of one example in the two tokenizations."""
    slm_starts = predicted_answer_starts(slm, slm_bytes)
    llm_at: dict[int, int] = {}
    for row, start in enumerate(predicted_answer_starts(llm, llm_bytes)):
        llm_at.setdefault(start, row)  # a token of no bytes starts where the next one does
    pairs, seen = [], set()
    for row, start in enumerate(slm_starts):
        if start in llm_at and start not in seen:
            seen.add(start)
            pairs.append((row, llm_at[start]))
    return AlignedExample(slm, llm, [s for s, _ in pairs], [t for _, t in pairs])


def encode_aligned(
    questions: Sequence[Question],
    indices: Sequence[int],
    slm_tokenizer,
    llm_tokenizer,
    config: Config,
    slm_bytes: torch.Tensor,
    llm_bytes: torch.Tensor,
) -> list[AlignedExample]:
    """D_a encoded for both models (each as `encode_examples` encodes it) and aligned;
    `*_bytes`: each token's byte length (`models.byte_lengths`)."""
    slm = encode_examples(questions, indices, slm_tokenizer, config)
    llm = encode_examples(questions, indices, llm_tokenizer, config)
    return [align(s, t, slm_bytes, llm_bytes) for s, t in zip(slm, llm, strict=True)]


def collate_aligned(examples: Sequence[AlignedExample], pad_ids: tuple[int, int]) -> AlignedBatch:
    """`pad_ids`: (SLM's, LLM's). The aligned rows are offset by the predicted answer
    positions of the examples before each in the batch."""
    slm_rows, llm_rows, slm_offset, llm_offset = [], [], 0, 0
    for e in examples:
        slm_rows += [slm_offset + r for r in e.slm_rows]
        llm_rows += [llm_offset + r for r in e.llm_rows]
        slm_offset += sum(e.slm.answer_mask[1:])
        llm_offset += sum(e.llm.answer_mask[1:])
    return AlignedBatch(
        collate([e.slm for e in examples], pad_ids[0]),
        collate([e.llm for e in examples], pad_ids[1]),
        torch.tensor(slm_rows, dtype=torch.long),
        torch.tensor(llm_rows, dtype=torch.long),
    )
