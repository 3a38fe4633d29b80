"""Step 3: the clients' adapters combined into one (the paper uses the plain mean, 1/K).

An aggregation rule is one class registered under the name `client.aggregation` gives it
(Flower's strategies override one method the same way: `FedMedian`). The rule is used
alike by the in-process reference, the plain Flower path (the server combines the
screened updates) and the secure one (each client scales its upload by `weight` before
masking, SecAgg+ sums, and the server divides); the arithmetic never imports Flower.
A rule that is not a weighted mean of the uploads cannot run under secure aggregation:
it says so with `secure = False`, and the config is refused. A rule that needs more of an
update than its adapter and size (FedNova: its steps) overrides `aggregate`; under secure
aggregation such a rule transforms each upload before masking (`upload`) and the mean
after unmasking (`from_mean`), from what the clients report in the clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedcollm.registry import AGGREGATIONS

if TYPE_CHECKING:  # checking a rule's name in a config imports this module: keep it light
    from fedcollm.algorithm.client import ClientUpdate
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

    def aggregate(self, updates: Sequence[ClientUpdate], broadcast: Adapter) -> Adapter:
        """theta from the round's updates of the `broadcast` theta."""
        weights = self.weights([u.num_examples for u in updates])
        return self.combine([u.adapter for u in updates], weights)

    def upload(self, adapter: Adapter, broadcast: Adapter, steps: int, scale: float) -> Adapter:
        """What a client masks under secure aggregation (the rule's weight is applied by
        SecAgg+ itself); `scale` is the number the server sent with theta."""
        return adapter

    def from_mean(
        self, mean: Adapter, broadcast: Adapter, steps: Sequence[int], weights, scale: float
    ) -> Adapter:
        """theta from the unmasked weighted mean of the uploads."""
        return mean

    def upload_scale(self, planned_steps: Sequence[int]) -> float:
        """The number the server sends with theta under secure aggregation."""
        return 1.0


@AGGREGATIONS.register("uniform")
class Uniform(AggregationRule):
    """The paper's 1/K."""


@AGGREGATIONS.register("num_examples")
class NumExamples(AggregationRule):
    """FedAvg's n_k / n."""

    def weight(self, num_examples: int) -> float:
        return num_examples


@AGGREGATIONS.register("fednova")
class FedNova(NumExamples):
    """FedNova (Wang et al., NeurIPS 2020) with local SGD's normaliser a_k = tau_k:
    theta + tau_eff sum_k p_k (theta_k - theta) / tau_k, with tau_eff = sum_k p_k tau_k and
    p_k = n_k / n. A client that took more steps moves theta no further than one that took
    fewer in the same direction; with equal steps it is FedAvg's weighted mean."""

    def aggregate(self, updates: Sequence[ClientUpdate], broadcast: Adapter) -> Adapter:
        weights = self.weights([u.num_examples for u in updates])
        tau_eff = sum(p * u.steps for p, u in zip(weights, updates, strict=True))
        rescaled = [rescale(u.adapter, broadcast, tau_eff / u.steps) for u in updates]
        return weighted_mean(rescaled, weights)

    def upload(self, adapter: Adapter, broadcast: Adapter, steps: int, scale: float) -> Adapter:
        # theta + (c / tau_k)(theta_k - theta), c the round's planned mean steps, so the
        # masked values stay of theta_k's size (SecAgg+ quantises to a fixed grid).
        return rescale(adapter, broadcast, scale / steps)

    def from_mean(
        self, mean: Adapter, broadcast: Adapter, steps: Sequence[int], weights, scale: float
    ) -> Adapter:
        tau_eff = sum(p * t for p, t in zip(weights, steps, strict=True))
        return rescale(mean, broadcast, tau_eff / scale)

    def upload_scale(self, planned_steps: Sequence[int]) -> float:
        return sum(planned_steps) / len(planned_steps)


def rescale(adapter: Adapter, broadcast: Adapter, factor: float) -> Adapter:
    """broadcast + factor * (adapter - broadcast), key by key, in float64."""
    return {
        k: (broadcast[k].double() + factor * (v.double() - broadcast[k].double())).float()
        for k, v in adapter.items()
    }


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
