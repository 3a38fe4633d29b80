"""Client-level differential privacy on theta: DP-FedAvg (McMahan et al. 2018) and its
accountant.

    client k:  delta_k = clip(theta_k - theta, C)                      (clip_update)
    sum:       sum_k delta_k + N(0, (sigma C)^2)                        (gaussian_noise)
    theta' = theta + sum / m, for the m clients that contributed

Without secure aggregation the server adds the noise. With it, the server must never see a
sum without noise, so each client adds its share N(0, (sigma C)^2 / q) before masking, where
q = federation.min_clients: any round that completes sums at least q shares, so no dropout
takes the noise below (sigma C)^2 (docs/PRIVACY.md).

The accountant composes the rounds with Rényi DP from Google's `dp-accounting`. Neighbouring
data sets differ in one client's data replaced by anyone else's (K is public), so the clipped
sum's sensitivity is 2C; m of K clients are sampled uniformly without replacement each round
(Wang, Balle, Kasiviswanathan 2019). Everything the server releases afterwards (the distilled
theta, the LLM with omega) is computed from the noised sum and the server's own D_a only:
post-processing, so it carries the same (epsilon, delta) with respect to any client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedcollm import dp
from fedcollm.config import Config, PrivacyConfig, sampled_clients
from fedcollm.keystream import fresh_secret, standard_normal, stream_key
from fedcollm.models import Adapter


def update_norm(adapter: Adapter, reference: Adapter) -> float:
    """L2 norm of theta_k - theta over all tensors, in float64."""
    return math.sqrt(
        sum(float((adapter[k].double() - reference[k].double()).pow(2).sum()) for k in adapter)
    )


def clip_update(adapter: Adapter, reference: Adapter, clip_norm: float) -> tuple[Adapter, float]:
    """theta + (theta_k - theta) scaled to L2 norm at most `clip_norm`; and the norm before."""
    norm = update_norm(adapter, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {
        k: (reference[k].double() + scale * (v.double() - reference[k].double())).float()
        for k, v in adapter.items()
    }
    return clipped, norm


def noise_key(privacy: PrivacyConfig, seed: int, server_round: int, party: str) -> bytes:
    """The noise's key: fresh OS randomness, or (noise_source = "seeded") one derived from the
    seed, for runs that must repeat bit for bit and need no privacy."""
    if privacy.noise_source == "system":
        return fresh_secret()
    return stream_key(f"{seed}/{server_round}/{party}".encode(), b"fedcollm dp noise")


def gaussian_noise(like: Adapter, std: float, key: bytes) -> Adapter:
    """N(0, std^2) for every value of an adapter's shape, from one ChaCha20 stream."""
    sizes = [like[k].numel() for k in sorted(like)]
    draws = torch.from_numpy(standard_normal(key, sum(sizes))) * std
    return {
        k: part.view(like[k].shape).float()
        for k, part in zip(sorted(like), torch.split(draws, sizes), strict=True)
    }


def add(adapter: Adapter, other: Adapter, scale: float = 1.0) -> Adapter:
    return {k: (v.double() + scale * other[k].double()).float() for k, v in adapter.items()}


def noise_std(config: Config) -> float:
    """The standard deviation of the noise on the clipped sum: sigma * C."""
    return config.privacy.noise_multiplier * config.privacy.clip_norm


def client_noise_std(config: Config) -> float:
    """A client's share under secure aggregation: variance (sigma C)^2 / min_clients."""
    return noise_std(config) / math.sqrt(config.federation.min_clients)


class PrivacyAccountant:
    """Rounds spent and what they cost: epsilon at `privacy.target_delta`.

    `epsilon` is what the released models reveal to anyone who does not know which clients
    each round sampled (amplification by sampling). Whoever knows the sample (the server,
    which draws it) gets no amplification: for it a client pays full price in each round it
    took part in, `epsilon_known_sample` (the worst client's). Every round that begins is
    counted, also one skipped later: that can only overstate."""

    def __init__(self, config: Config):
        self.privacy, self.population = config.privacy, config.num_clients
        self.sampled = sampled_clients(config)
        self.rounds = 0
        self.participation = [0] * self.population

    def _epsilon(self, rounds: int, sampled: int) -> float:
        privacy = self.privacy
        return dp.epsilon(
            privacy.noise_multiplier, privacy.target_delta, self.population, sampled, rounds
        )

    def epsilon(self, rounds: int | None = None) -> float:
        return self._epsilon(self.rounds if rounds is None else rounds, self.sampled)

    def epsilon_known_sample(self) -> float:
        return self._epsilon(max(self.participation), self.population)

    def rounds_within(self, max_epsilon: float, limit: int) -> int:
        """How many rounds in all (spent ones included, at most `limit`) keep epsilon within
        `max_epsilon`."""
        low, high = self.rounds, limit  # epsilon grows with the rounds: bisect
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.epsilon(middle) <= max_epsilon else (low, middle - 1)
        return low

    def spend_round(self, partitions: Sequence[int]) -> None:
        self.rounds += 1
        for k in partitions:
            self.participation[k] += 1

    def spent(self) -> dict[str, float | None]:
        """The metrics row's privacy columns; an infinite epsilon (clipping without noise)
        is null, which JSON can hold."""
        finite = {
            "epsilon": self.epsilon(),
            "epsilon_known_sample": self.epsilon_known_sample(),
        }
        finite = {k: None if math.isinf(v) else v for k, v in finite.items()}
        return {**finite, "delta": self.privacy.target_delta}

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "participation": list(self.participation)}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self.participation = [int(n) for n in state.get("participation", self.participation)]
