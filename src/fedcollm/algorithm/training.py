"""Supervised fine-tuning on answer tokens: the client update, and the standalone and
centralised baselines, which are the same loop on other data."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.config import OptimConfig
from fedcollm.data import Batch, Example, training_batches
from fedcollm.models import answer_logits


def answer_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits, targets = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, optim: OptimConfig):
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=lr,
        betas=(optim.beta1, optim.beta2),
        weight_decay=optim.weight_decay,
    )


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


@dataclass
class TrainResult:
    mean_loss: float
    steps: int
    num_examples: int


def fine_tune(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    epochs: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    optim: OptimConfig,
    pad_id: int,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
    stop_after_s: float = 0.0,
) -> TrainResult:
    """E epochs (at most `max_steps` steps when > 0) of AdamW on the answer-token loss;
    with `stop_after_s`, no step begins after that many seconds (a wall-clock deadline)."""
    total = epochs * math.ceil(len(examples) / batch_size)
    if max_steps:
        total = min(total, max_steps)
    optimizer = make_optimizer(model.parameters(), lr, optim)
    model.train()
    torch.manual_seed(seed)  # LoRA dropout
    losses = []
    batches = training_batches(examples, batch_size, pad_id, epochs, seed)
    start = time.perf_counter()
    for step, batch in zip(range(1, total + 1), batches, strict=False):
        if stop_after_s and time.perf_counter() - start > stop_after_s:
            break
        loss = answer_loss(model, batch)
        optimizer_step(optimizer, loss, optim.max_grad_norm)
        losses.append(loss.item())
        if on_step:
            on_step(step, total, losses[-1])
    return TrainResult(sum(losses) / max(len(losses), 1), len(losses), len(examples))
