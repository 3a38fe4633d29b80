"""Step 2 of Algorithm 1: a client tunes the broadcast theta on its private data D_k."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedcollm import seeds
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


def client_update(
    slm,
    slm_adapter: Adapter,
    client_data: Sequence[Example],
    config: Config,
    pad_id: int,
    seed: int,
    on_step: StepCallback | None = None,
) -> ClientUpdate:
    """Start from the broadcast theta and tune it on the client's private data."""
    set_adapter(slm, slm_adapter)
    result = fine_tune(
        slm,
        client_data,
        epochs=config.client.local_epochs,
        max_steps=config.client.max_steps,
        batch_size=config.client.batch_size,
        lr=config.client.lr,
        optim=config.optim,
        pad_id=pad_id,
        seed=seed,
        on_step=on_step,
    )
    return ClientUpdate(get_adapter(slm), result.num_examples, result.mean_loss, result.steps)


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
        return client_update(
            self.slm, slm_adapter, self.client_data, self.config, self.pad_id, seed, on_step
        )
