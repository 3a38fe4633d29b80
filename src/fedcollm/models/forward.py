"""How the algorithm runs a model: its output layer on chosen hidden states only, and eval
mode for a block of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output layer on selected final hidden states: (N, H) -> (N, V)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 squashes its logits; the full forward would too
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout) inside the block, its own mode again after it,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward in train mode is random: some dropout with p > 0 (LoRA's included)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
