"""Every seed of a run, derived from the config's `seed` in this one place.

Roles get distinct seeds, so that a tiny LLM and a tiny SLM are not the same random network
and no two clients or rounds draw the same batches or LoRA dropout masks. `seed` is at most
`MAX_SEED` (the config checks it), so no derived seed leaves torch's 64-bit range.
"""

from __future__ import annotations

MAX_SEED = 2**32 - 1


def slm_weights(seed: int) -> int:
    """The SLM's base weights (tiny models) and its fresh LoRA: the same on every party."""
    return seed


def llm_weights(seed: int) -> int:
    return seed + 1


def data_split(seed: int) -> int:
    """The cut of the training split into D_a and D_1..D_K."""
    return seed


def client_round(seed: int, server_round: int, partition: int) -> int:
    """Client k's batches and LoRA dropout in one round."""
    return (seed * 1_000 + server_round) * 1_000 + partition


def distillation_round(seed: int, server_round: int) -> int:
    """The server's batches of D_a and LoRA dropout in one round's distillation."""
    return seed * 100_003 + server_round


def client_sample(seed: int, server_round: int) -> int:
    """Which clients take part in a round (federation.clients_per_round)."""
    return seed * 100_019 + server_round + 7


def standalone_client(seed: int, partition: int) -> int:
    """The standalone baseline's client k, which trains once over all its rounds' budget."""
    return seed * 1_000 + partition


def centralized(seed: int) -> int:
    return seed
