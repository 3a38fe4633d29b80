"""Step 3: the clients' adapters combined into one (the paper uses the plain mean, 1/K).

The modes are `client.aggregation`'s values; this module is the one that gives them meaning,
for plain aggregation here and for the weights each client hands to SecAgg+."""

from __future__ import annotations

from collections.abc import Sequence

from fedcollm.models import Adapter


def client_weight(num_examples: int, mode: str) -> int:
    """A client's weight before normalising: 1 ("uniform") or |D_k| ("num_examples")."""
    if mode == "uniform":
        return 1
    if mode == "num_examples":
        return num_examples
    raise ValueError(f"aggregation must be 'uniform' or 'num_examples', got {mode!r}")


def client_weights(num_examples: Sequence[int], mode: str) -> list[float]:
    """Aggregation weights that sum to 1: 1/K each, or n_k / n."""
    weights = [client_weight(n, mode) for n in num_examples]
    total = sum(weights)
    return [w / total for w in weights]


def weighted_mean(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """sum_k w_k * theta_k, key by key, accumulated in float64 and returned in float32."""
    if not adapters:
        raise ValueError("no client adapters to aggregate")
    return {
        key: sum(w * a[key].double() for a, w in zip(adapters, weights, strict=True)).float()
        for key in adapters[0]
    }
