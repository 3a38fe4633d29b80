"""Step 3: the clients' adapters combined into one (the paper uses the plain mean, 1/K).

An aggregation rule is one class registered under the name `client.aggregation` gives it
(Flower's strategies override one method the same way: `FedMedian`). The rule is used
alike by the in-process reference, the plain Flower path (the server combines the
screened updates) and the secure one (each client scales its upload by `weight` before
masking, SecAgg+ sums, and the server divides); the arithmetic never imports Flower.
A rule that is not a weighted mean of the uploads cannot run under secure aggregation:
it says so with `secure = False`, and the config is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedcollm.registry import AGGREGATIONS

if TYPE_CHECKING:  # checking a rule's name in a config imports this module: keep it light
    from fedcollm.models import Adapter


class AggregationRule:
    """The weighted mean sum_k w_k theta_k / sum_k w_k, with w_k from `weight`."""

    secure = True  # a weighted mean of the uploads: what SecAgg+ can compute

    def weight(self, num_examples: int) -> float:
        """Client k's weight before normalising, from what it reports (|D_k|)."""
        return 1

    def combine(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        """theta from the clients' adapters and their normalised weights."""
        return weighted_mean(adapters, weights)

    def weights(self, num_examples: Sequence[int]) -> list[float]:
        """Every client's weight, normalised to sum to 1."""
        raw = [self.weight(n) for n in num_examples]
        total = sum(raw)
        return [w / total for w in raw]


@AGGREGATIONS.register("uniform")
class Uniform(AggregationRule):
    """The paper's 1/K."""


@AGGREGATIONS.register("num_examples")
class NumExamples(AggregationRule):
    """FedAvg's n_k / n."""

    def weight(self, num_examples: int) -> float:
        return num_examples


def aggregation_rule(name: str) -> AggregationRule:
    """The rule `client.aggregation` names (the config checked the name)."""
    return AGGREGATIONS[name]()


def weighted_mean(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """sum_k w_k * theta_k, key by key, accumulated in float64 and returned in float32."""
    if not adapters:
        raise ValueError("no client adapters to aggregate")
    return {
        key: sum(w * a[key].double() for a, w in zip(adapters, weights, strict=True)).float()
        for key in adapters[0]
    }
