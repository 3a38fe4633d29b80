"""Heterogeneous LoRA ranks (issue 28 §2): clients that hold fewer of theta's rank slices.

theta is kept at the largest rank, r_max = `lora.r`; slice j is row j of every lora_A and
column j of every lora_B. A client of rank r_k < r_max trains the leading r_k slices
(HetLoRA, Cho et al. 2024: truncation down): it zeroes the others, which then stay exactly
zero in training, since each zeroed slice's gradient is the product of the other zeroed
factor. With the same scaling alpha / r_max everywhere, its model is theta's rank-r_k part.
It sends back its r_k slices and, beyond them, the slices it received (so its update
theta_k - theta is zero there, which DP's clipping and the server's screening read).

Two ways to combine:
- "slices": each slice is averaged over the clients that hold it (HetLoRA's zero-padding,
  in update space): theta_j + (mean_j - theta_j) / h_j, with h_j the holders' share of the
  weight. Under secure aggregation the same formula from the unmasked mean, h_j from a
  masked per-slice count each client adds to its upload.
- "flexlora" (Bai et al., NeurIPS 2024): the exact weighted mean of the clients' products
  B_k A_k, factorised again by truncated SVD at r_max; a client then takes the leading r_k
  singular directions, the best rank-r_k approximation. It needs every product: not with
  secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcollm.config import Config, client_profile
from fedcollm.models import Adapter

HOLDERS = "rank_slices_held"  # the per-slice count's key in a secure upload


def client_rank(config: Config, partition: int | None) -> int:
    """Client `partition`'s LoRA rank: its profile's `lora_r`, else `lora.r`."""
    profile = client_profile(config, partition)
    return profile.lora_r if profile and profile.lora_r else config.lora.r


def heterogeneous(config: Config) -> bool:
    return any(client_rank(config, k) < config.lora.r for k in range(config.num_clients))


def _rank_dim(key: str) -> int | None:
    """The dimension of a LoRA tensor that indexes rank slices (None: not a LoRA factor)."""
    if "lora_A" in key:
        return 0
    if "lora_B" in key:
        return 1
    return None


def _slices(key: str, tensor: torch.Tensor, start: int) -> torch.Tensor:
    """A view of the slices from `start` on."""
    dim = _rank_dim(key)
    return tensor[start:] if dim == 0 else tensor[:, start:]


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """The leading `rank` slices, the others zero: what a rank-`rank` client trains."""
    out = {}
    for key, value in adapter.items():
        out[key] = value.clone()
        if _rank_dim(key) is not None:
            _slices(key, out[key], rank).zero_()
    return out


def pad(adapter: Adapter, broadcast: Adapter, rank: int) -> Adapter:
    """The client's `rank` slices, and beyond them the slices it received."""
    out = {}
    for key, value in adapter.items():
        out[key] = value.clone()
        if _rank_dim(key) is not None:
            _slices(key, out[key], rank).copy_(_slices(key, broadcast[key], rank))
    return out


def holder_share(ranks: Sequence[int], weights: Sequence[float], r_max: int) -> torch.Tensor:
    """Per slice j, the share of the aggregation weight held by clients of rank above j."""
    return torch.tensor(
        [sum(w for r, w in zip(ranks, weights, strict=True) if r > j) for j in range(r_max)],
        dtype=torch.float64,
    )


def held(rank: int, r_max: int) -> torch.Tensor:
    """A client's per-slice count (1 for each slice it holds): masked beside its adapter."""
    return (torch.arange(r_max) < rank).float()


def per_slice_mean(mean: Adapter, broadcast: Adapter, share: torch.Tensor) -> Adapter:
    """theta_j + (mean_j - theta_j) / h_j: each slice's mean over the clients holding it,
    from the mean over all clients (whose non-holders sent theta_j). A slice no client
    holds stays as it was."""
    out = {}
    for key, value in mean.items():
        dim = _rank_dim(key)
        if dim is None:
            out[key] = value
            continue
        h = share.view(-1, 1) if dim == 0 else share.view(1, -1)
        theta = broadcast[key].double()
        moved = theta + (value.double() - theta) / h.clamp(min=1e-12)
        out[key] = torch.where(h > 0, moved, theta).float()
    return out


def flexlora(
    adapters: Sequence[Adapter], weights: Sequence[float], ranks: Sequence[int], r_max: int
) -> Adapter:
    """FlexLoRA: per module, the weighted mean of the clients' own products (each at its
    rank), refactorised by truncated SVD at r_max with the singular values split evenly
    between B and A; other tensors are averaged."""
    out: Adapter = {}
    for key in adapters[0]:
        if "lora_B" in key:
            continue
        if "lora_A" not in key:
            out[key] = sum(w * a[key].double() for w, a in zip(weights, adapters, strict=True))
            out[key] = out[key].float()
            continue
        b_key = key.replace("lora_A", "lora_B")
        # The mean product is B_cat A_cat, inner size sum r_k: its SVD from two thin QRs
        # and the SVD of a small core, never the dense out x in matrix (200 s a round for
        # the demo SLM's 96 modules with dense SVDs on the loaded 2-core machine).
        b_cat = torch.cat(
            [
                w * a[b_key][:, :r].double()
                for w, a, r in zip(weights, adapters, ranks, strict=True)
            ],
            dim=1,
        )
        a_cat = torch.cat([a[key][:r].double() for a, r in zip(adapters, ranks, strict=True)])
        q_b, r_b = torch.linalg.qr(b_cat)
        q_a, r_a = torch.linalg.qr(a_cat.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        k = min(r_max, s.numel())
        root = s[:k].sqrt()
        out[b_key] = torch.zeros(b_cat.shape[0], r_max)
        out[key] = torch.zeros(r_max, a_cat.shape[1])
        out[b_key][:, :k] = ((q_b @ u[:, :k]) * root).float()
        out[key][:k] = (root[:, None] * (vh[:k] @ q_a.T)).float()
    return out


def product_error(adapters: Sequence[Adapter], weights: Sequence[float], ranks, aggregate) -> float:
    """||mean(B_k A_k) - B A|| / ||mean(B_k A_k)|| over all LoRA modules (Frobenius), each
    client's product at its own rank, B A the aggregate theta's: what combining A and B
    costs against the exact mean of the clients' models."""
    exact = error = 0.0
    for a_key in (k for k in aggregate if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        mean = sum(
            w * (a[b_key][:, :r].double() @ a[a_key][:r].double())
            for w, a, r in zip(weights, adapters, ranks, strict=True)
        )
        exact += float(mean.pow(2).sum())
        error += float((mean - aggregate[b_key].double() @ aggregate[a_key].double()).pow(2).sum())
    return (error / exact) ** 0.5 if exact > 0 else 0.0
