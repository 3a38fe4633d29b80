"""Screening of client updates before aggregation: the server trusts no client.

An update must be exactly the adapter the server sent, tuned: the same keys, shapes and
wire dtype, finite values, and an L2 distance from the broadcast theta within a bound. One
bad client then costs its own contribution, never the round or the global adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedcollm.models import Adapter


class UpdateRejected(ValueError):
    """A client update that must not be aggregated; the message says why."""


def _listed(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_update(
    update: Mapping[str, torch.Tensor] | None,
    sent: Adapter,
    wire_dtype: torch.dtype,
    max_norm: float,
) -> float:
    """The L2 norm of update - sent; UpdateRejected unless `update` is a well-formed tuning
    of the adapter `sent`.

    `update` holds the tensors as they arrived (in their wire dtype); `max_norm` bounds the
    norm over all tensors (0 disables the bound)."""
    if not update:
        raise UpdateRejected("empty update: it carries no adapter tensors")
    missing, extra = set(sent) - set(update), set(update) - set(sent)
    if missing:
        raise UpdateRejected(f"missing adapter keys: {_listed(missing)}")
    if extra:
        raise UpdateRejected(f"unexpected adapter keys: {_listed(extra)}")
    squared = 0.0
    for key, reference in sent.items():
        value = update[key]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(f"{key}: not a tensor but {type(value).__name__}")
        if value.shape != reference.shape:
            raise UpdateRejected(
                f"{key}: shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
            )
        if value.dtype != wire_dtype:
            raise UpdateRejected(f"{key}: dtype {value.dtype}, expected {wire_dtype}")
        if not torch.isfinite(value).all():
            raise UpdateRejected(f"{key}: holds NaN or Inf values")
        squared += (value.double() - reference.double()).pow(2).sum().item()
    norm = math.sqrt(squared)
    if max_norm > 0 and norm > max_norm:
        raise UpdateRejected(
            f"update norm {norm:.4g} exceeds federation.max_update_norm = {max_norm:g}"
        )
    return norm
