"""Named extension points: one registration adds a member, and whatever chooses among the
members (a config key, a task file's metric_list, `experiment --methods`) accepts it at once
(lm-eval's `@register_metric`, PEFT's `register_peft_method`).

The registries live here, below every layer, so that `config/` and the task-file reader
can check a name without importing the layers that implement the members. Each knows the
module that registers its built-in members (`home`) and imports it on first use. A member
added outside fedcollm must be registered (its module imported) before a config that
names it is loaded; in a simulated or deployed run, also in every process that uses it.

| registry           | chosen by                  | a member (registered in)                     |
| ------------------ | -------------------------- | -------------------------------------------- |
| `AGGREGATIONS`     | `client.aggregation`       | an `AggregationRule` (algorithm/aggregation) |
| `DISTANCES`        | `distill.kd_direction`     | a distance on log-probs (algorithm/distances)|
| `CROSS_VOCABULARY` | `distill.cross_tokenizer`  | a distance's factory (algorithm/distances)   |
| `METRICS`          | a task file's `metric_list`| a `Metric` (evaluation/metrics)              |
| `METHODS`          | `experiment --methods`     | a `Method` (experiments/methods)             |
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any


class Registry:
    """Members by name, in the order they were registered."""

    def __init__(self, key: str, home: str):
        self.key, self.home = key, home  # the config key that names a member; its module
        self._members: dict[str, Any] = {}

    def register(self, name: str, member: Any = None) -> Any:
        """`@REGISTRY.register("name")` over a function or class, or `register(name, obj)`."""

        def add(obj: Any) -> Any:
            if name in self._members and self._members[name] is not obj:
                raise ValueError(f"{self.key}: {name!r} is registered already")
            self._members[name] = obj
            return obj

        return add if member is None else add(member)

    def _loaded(self) -> dict[str, Any]:
        importlib.import_module(self.home)  # registers the built-in members (once)
        return self._members

    def names(self) -> list[str]:
        return list(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __getitem__(self, name: str) -> Any:
        members = self._loaded()
        if name not in members:
            raise KeyError(f"{self.key}: {name!r} is not registered; choose one of {self}")
        return members[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def items(self) -> list[tuple[str, Any]]:
        return list(self._loaded().items())

    def values(self) -> list[Any]:
        return list(self._loaded().values())

    def __str__(self) -> str:
        return " | ".join(repr(name) for name in self._loaded())

    def unregister(self, name: str) -> None:
        """Take a member out again (tests that register a toy member)."""
        self._members.pop(name, None)


AGGREGATIONS = Registry("client.aggregation", "fedcollm.algorithm.aggregation")
DISTANCES = Registry("distill.kd_direction", "fedcollm.algorithm.distances")
CROSS_VOCABULARY = Registry("distill.cross_tokenizer", "fedcollm.algorithm.distances")
METRICS = Registry("metric_list", "fedcollm.evaluation.metrics")
METHODS = Registry("--methods", "fedcollm.experiments.methods")
