"""Step 2 of Algorithm 1: a client tunes the broadcast theta on its private data D_k."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedcollm import seeds
from fedcollm.algorithm.compute import DROPPED, ON_TIME, finished, round_plan, wall_stop
from fedcollm.algorithm.privacy import add, client_noise_std, clip_update, gaussian_noise, noise_key
from fedcollm.algorithm.ranks import client_rank, pad, truncate
from fedcollm.algorithm.training import fine_tune
from fedcollm.config import Config
from fedcollm.data import Example
from fedcollm.models import Adapter, get_adapter, set_adapter

StepCallback = Callable[[int, int, float], None]


@dataclass
class ClientUpdate:
    """What a client sends back: theta_k and what the server may weigh or log it by."""

    adapter: Adapter
    num_examples: int
    train_loss: float
    steps: int
    # On the round's clock (algorithm/compute.py): the seconds its steps took, and whether
    # it was on time, late and waited for, partial, or dropped (then not aggregated).
    seconds: float = 0.0
    outcome: str = ON_TIME
    rank: int = 0  # its LoRA rank; 0: theta's (lora.r)
    partition: int = -1  # whose: which group it belongs to (algorithm/groups.py)

    @property
    def contributes(self) -> bool:
        return self.outcome != DROPPED


def client_update(
    slm,
    slm_adapter: Adapter,
    client_data: Sequence[Example],
    config: Config,
    pad_id: int,
    seed: int,
    on_step: StepCallback | None = None,
    partition: int = 0,
) -> ClientUpdate:
    """Start from the broadcast theta (its leading slices, at the client's own rank) and
    tune it on the client's private data, with the client's own budget, as far as the
    round's deadline lets it."""
    rank = client_rank(config, partition)
    set_adapter(slm, truncate(slm_adapter, rank))
    budget, plan = round_plan(config, partition, len(client_data))
    if not plan.contributes:  # dropped on the simulated clock: no work would count
        return ClientUpdate(
            slm_adapter, len(client_data), math.nan, 0, plan.seconds, plan.outcome, rank, partition
        )
    start = time.perf_counter()
    result = fine_tune(
        slm,
        client_data,
        epochs=budget.local_epochs,
        max_steps=plan.steps,
        batch_size=budget.batch_size,
        lr=config.client.lr,
        optim=config.optim,
        pad_id=pad_id,
        seed=seed,
        on_step=on_step,
        stop_after_s=wall_stop(config),
    )
    done = finished(config, plan, result.steps, time.perf_counter() - start)
    return ClientUpdate(
        pad(get_adapter(slm), slm_adapter, rank),
        result.num_examples,
        result.mean_loss,
        result.steps,
        done.seconds,
        done.outcome,
        rank,
        partition,
    )


def private_adapter(
    adapter: Adapter, slm_adapter: Adapter, config: Config, server_round: int, partition: int
) -> Adapter:
    """What a DP client sends: its update clipped to privacy.clip_norm and, under secure
    aggregation (where the server cannot add noise to a sum it never sees), its share of
    the noise, added before masking."""
    clipped, _ = clip_update(adapter, slm_adapter, config.privacy.clip_norm)
    if not (config.federation.secure_aggregation and config.privacy.noise_multiplier):
        return clipped
    key = noise_key(config.privacy, config.seed, server_round, f"client {partition}")
    return add(clipped, gaussian_noise(clipped, client_noise_std(config), key))


@dataclass
class Client:
    """Client k: its partition number, its SLM and its encoded D_k.

    Several clients of one process may share one SLM: every update begins by overwriting all
    of its LoRA weights with the broadcast theta, so nothing carries over between clients."""

    partition: int
    slm: object
    pad_id: int
    client_data: list[Example]
    config: Config

    def update(
        self, slm_adapter: Adapter, server_round: int, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        seed = seeds.client_round(self.config.seed, server_round, self.partition)
        update = client_update(
            self.slm,
            slm_adapter,
            self.client_data,
            self.config,
            self.pad_id,
            seed,
            on_step,
            self.partition,
        )
        if self.config.privacy.enabled:
            update.adapter = private_adapter(
                update.adapter, slm_adapter, self.config, server_round, self.partition
            )
            # What it scores is what it sends (at its own rank).
            rank = client_rank(self.config, self.partition)
            set_adapter(self.slm, truncate(update.adapter, rank))
        return update
