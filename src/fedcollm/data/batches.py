"""The tokenised batches every training loop runs on."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedcollm.data.encoding import Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    answer_mask: torch.Tensor  # (B, L) True where the token belongs to the answer

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.answer_mask))
        )

    @property
    def answer_targets(self) -> torch.Tensor:
        """(N,) the answer tokens, row-major: what the N answer positions predict (position t
        predicts token t + 1)."""
        return self.input_ids[:, 1:][self.answer_mask[:, 1:]]

    @property
    def answer_examples(self) -> torch.Tensor:
        """(N,) the example (batch row) each answer position belongs to, row-major."""
        return self.answer_mask[:, 1:].nonzero()[:, 0]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    answer = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        answer[row, :n] = torch.tensor(e.answer_mask)
    return Batch(ids, attention, answer)


def training_batches(
    examples: Sequence[Any],
    batch_size: int,
    pad_id: Any,
    epochs: int,
    seed: int,
    collate_fn: Callable[[Sequence[Any], Any], Any] = collate,
) -> Iterator[Any]:
    """Shuffled batches, epoch after epoch; the order depends only on `seed`. `collate_fn`
    makes a batch of the chosen examples and `pad_id` (`collate` and its Batch: one
    tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate_fn([examples[i] for i in order[start : start + batch_size]], pad_id)


def cycle_batches(
    examples: Sequence[Any],
    batch_size: int,
    pad_id: Any,
    steps: int,
    seed: int,
    collate_fn: Callable[[Sequence[Any], Any], Any] = collate,
) -> Iterator[Any]:
    """Exactly `steps` shuffled batches, wrapping around the examples as often as needed."""
    epochs = -(-steps * batch_size // len(examples))
    stream = training_batches(examples, batch_size, pad_id, epochs, seed, collate_fn)
    for _ in range(steps):
        yield next(stream)
