"""Which profile, SLM and share of the rounds each client has: read from a built Config."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedcollm.config.parse import build
from fedcollm.config.schema import ClientProfile, Config, ModelConfig


def client_profile(config: Config, partition: int | None) -> ClientProfile | None:
    """The `[[client.profiles]]` entry holding client `partition` (None: none holds it)."""
    return next((p for p in config.client.profiles if partition in p.clients), None)


def client_slm(config: Config, partition: int) -> ModelConfig:
    """Client `partition`'s SLM: its profile's, else the [slm] table's."""
    profile = client_profile(config, partition)
    return profile_slm(config, profile) if profile else config.slm


def slm_members(config: Config) -> list[tuple[ModelConfig, list[int]]]:
    """Each SLM the clients hold and its clients, in the order of their first client."""
    members: dict[str, tuple[ModelConfig, list[int]]] = {}
    for k in range(config.num_clients):
        model = client_slm(config, k)
        key = repr(dataclasses.asdict(model))
        members.setdefault(key, (model, []))[1].append(k)
    return list(members.values())


def profile_slm(config: Config, profile: ClientProfile, key: str = "") -> ModelConfig:
    """A profile's SLM: the [slm] table with the profile's `slm` keys over it."""
    if not profile.slm:
        return config.slm

    def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        return {
            k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in {**base, **over}.items()
        }

    return build(ModelConfig, merged(dataclasses.asdict(config.slm), profile.slm), key)


def sampled_clients(config: Config) -> int:
    """The clients each round takes: `federation.clients_per_round`, else all of them."""
    return config.federation.clients_per_round or config.num_clients
