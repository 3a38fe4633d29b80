"""The tokenised batches every training loop runs on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    examples: Sequence[Example], batch_size: int, pad_id: int, epochs: int, seed: int
) -> Iterator[Batch]:
    """Shuffled batches, epoch after epoch; the order depends only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def cycle_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, steps: int, seed: int
) -> Iterator[Batch]:
    """Exactly `steps` shuffled batches, wrapping around the examples as often as needed."""
    epochs = -(-steps * batch_size // len(examples))
    stream = training_batches(examples, batch_size, pad_id, epochs, seed)
    for _ in range(steps):
        yield next(stream)
