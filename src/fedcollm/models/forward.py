"""How the algorithm runs a model: its output layer on chosen hidden states only (the answer
positions of a batch), and eval mode for a block of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedcollm.data.batches import Batch
from fedcollm.models.loading import model_device


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output layer on selected final hidden states: (N, H) -> (N, V)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 squashes its logits; the full forward would too
        logits = torch.tanh(logits / cap) * cap
    return logits


def answer_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at the positions that predict an answer token, and those tokens.

    Position t predicts token t+1, so the answer mask is shifted by one against the hidden
    states. Only the N answer positions go through the output layer: (N, V) instead of
    (B, L, V), which matters with a 150k-token vocabulary. Returns (N, V) logits and (N,)
    targets, row-major over the batch.
    """
    device = model_device(model)
    batch = batch.to(device)  # batches are made on the CPU
    dtype = getattr(model, "autocast_dtype", None)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,  # the model's own logits are not used; keep them to one position
        )
        predicts = batch.answer_mask[:, 1:]  # (B, L-1)
        hidden = out.hidden_states[-1][:, :-1][predicts]  # (N, H): final-norm output
        logits = output_logits(model, hidden)
    # Losses and distances in float32 whatever the forward ran in.
    return (logits.float() if dtype else logits), batch.answer_targets


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
