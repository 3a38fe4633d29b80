"""Step 3: the clients' adapters combined into one (the paper uses the plain mean, 1/K)."""

from __future__ import annotations

from collections.abc import Sequence

from fedcollm.models import Adapter


def client_weights(num_examples: Sequence[int], mode: str) -> list[float]:
    """Aggregation weights that sum to 1: "uniform" (1/K) or "num_examples" (n_k / n)."""
    if mode == "uniform":
        return [1.0 / len(num_examples)] * len(num_examples)
    if mode == "num_examples":
        total = sum(num_examples)
        return [n / total for n in num_examples]
    raise ValueError(f"aggregation must be 'uniform' or 'num_examples', got {mode!r}")


def weighted_mean(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """sum_k w_k * theta_k, key by key, accumulated in float64 and returned in float32."""
    if not adapters:
        raise ValueError("no client adapters to aggregate")
    return {
        key: sum(w * a[key].double() for a, w in zip(adapters, weights, strict=True)).float()
        for key in adapters[0]
    }
