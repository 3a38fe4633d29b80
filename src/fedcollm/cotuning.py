"""FedCoLLM (Fan et al., arXiv 2411.11707), Algorithm 1, without any federation runtime.

| paper                                   | code                        |
| --------------------------------------- | --------------------------- |
| f_psi (server LLM), omega (its LoRA)    | `llm`, `llm_adapter`        |
| g_phi (SLM), theta (global SLM LoRA)    | `slm`, `slm_adapter`        |
| theta_k (client k's LoRA)               | `ClientUpdate.adapter`      |
| D_k, D_a                                | `client_data`, `aux_data`   |
| lambda, temperature                     | `kd_weight`, `kd_temperature` |
| T rounds, E local epochs, R KD steps    | `rounds`, `local_epochs`, `kd_steps` |

One round: (1) the server broadcasts theta; (2) every client tunes it on D_k
(`client_update`); (3) the server aggregates the client adapters and (4) runs mutual
distillation between the LLM and the SLM on D_a (`CoTuningServer.server_update`); (5) the
distilled theta is what the next round broadcasts. The Flower apps only carry the messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedcollm.aggregation import client_weights, weighted_mean
from fedcollm.config import Config, ModelConfig
from fedcollm.data import DataSplit, Example, encode_answer, split_training_data
from fedcollm.distillation import MutualDistillation
from fedcollm.evaluation import Accuracy, evaluate_multiple_choice
from fedcollm.models import (
    Adapter,
    ModelError,
    add_lora,
    get_adapter,
    load_model,
    save_adapter,
    set_adapter,
)
from fedcollm.tasks import Question, load_questions
from fedcollm.training import fine_tune

# Distinct seeds per role, so that a tiny LLM and a tiny SLM are not the same random network.
SLM_SEED_OFFSET, LLM_SEED_OFFSET = 0, 1


def build_tuned_model(spec: ModelConfig, config: Config, seed: int):
    """A model with a fresh, seeded LoRA adapter, and its tokenizer."""
    model, tokenizer = load_model(spec, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = add_lora(model, config.lora)
    return model, tokenizer


def build_slm(config: Config):
    """The SLM every party holds: same base weights on the server and all clients."""
    return build_tuned_model(config.slm, config, config.seed + SLM_SEED_OFFSET)


def training_split(config: Config) -> tuple[list[Question], DataSplit]:
    """The training questions and their seeded cut into D_a and D_1..D_K."""
    questions = load_questions(config.task, "train", config.data_dir)
    split = split_training_data(
        questions,
        config.num_clients,
        config.seed,
        partition=config.data.partition,
        alpha=config.data.dirichlet_alpha,
        by=config.data.dirichlet_by,
        limit=config.data.train_limit,
    )
    return questions, split


def encode(questions: Sequence[Question], indices: Sequence[int], tokenizer, config: Config):
    return [encode_answer(tokenizer, questions[i], config.data.max_length) for i in indices]


@dataclass
class ClientUpdate:
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
    on_step: Callable[[int, int, float], None] | None = None,
) -> ClientUpdate:
    """Step 2: start from the broadcast theta and tune it on the client's private data."""
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
class ServerRound:
    """What steps 3-4 produced: theta before and after distillation, losses, timings."""

    aggregate: Adapter
    slm_adapter: Adapter
    losses: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


class CoTuningServer:
    """The server's side: the LLM with omega, its copy of the SLM with theta, and D_a.

    The LLM and omega are only ever read here; nothing in this class hands them out."""

    def __init__(
        self, config: Config, llm, slm, tokenizer, aux_data: Sequence[Example], split: DataSplit
    ):
        self.config, self.llm, self.slm, self.tokenizer = config, llm, slm, tokenizer
        self.aux_data, self.split = list(aux_data), split
        self.distillation = MutualDistillation(llm, slm, config.distill, config.optim)

    @classmethod
    def from_config(cls, config: Config) -> CoTuningServer:
        llm, llm_tokenizer = build_tuned_model(config.llm, config, config.seed + LLM_SEED_OFFSET)
        slm, tokenizer = build_slm(config)
        if llm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ModelError(
                f"llm.name {config.llm.name!r} and slm.name {config.slm.name!r} use different "
                "tokenizers; mutual distillation compares their next-token distributions, so "
                "pick two models of one family (same tokenizer)"
            )
        questions, split = training_split(config)
        aux_data = encode(questions, split.aux, tokenizer, config)
        return cls(config, llm, slm, tokenizer, aux_data, split)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def slm_adapter(self) -> Adapter:
        return get_adapter(self.slm)

    def server_update(
        self,
        updates: Sequence[ClientUpdate],
        server_round: int,
        on_step: Callable | None = None,
    ) -> ServerRound:
        """Steps 3-4: aggregate the client adapters into theta, then co-tune on D_a.

        The returned `slm_adapter` (theta after distillation) is what step 5 broadcasts."""
        start = time.perf_counter()
        weights = client_weights([u.num_examples for u in updates], self.config.client.aggregation)
        aggregate = weighted_mean([u.adapter for u in updates], weights)
        return self.co_tune(aggregate, server_round, on_step, time.perf_counter() - start)

    def co_tune(
        self,
        aggregate: Adapter,
        server_round: int,
        on_step: Callable | None = None,
        aggregation_seconds: float = 0.0,
    ) -> ServerRound:
        """Step 4 from an aggregate theta (secure aggregation hands over only that)."""
        start = time.perf_counter()
        set_adapter(self.slm, aggregate)
        seconds = {"aggregation": aggregation_seconds + time.perf_counter() - start}
        start = time.perf_counter()
        losses: dict[str, float] = {}
        if self.config.distill.enabled:
            seed = self.config.seed * 100_003 + server_round
            losses = self.distillation.run(self.aux_data, self.pad_id, seed, on_step).means()
        seconds["distillation"] = time.perf_counter() - start
        return ServerRound(aggregate, self.slm_adapter, losses, seconds)

    def evaluate(
        self, questions: Sequence[Question], roles: Sequence[str] = ("llm", "slm")
    ) -> dict[str, Accuracy]:
        """Accuracy of the LLM (with omega) and/or of the global SLM (with theta)."""
        models = {"llm": self.llm, "slm": self.slm}
        return {role: score(models[role], self.tokenizer, self.config, questions) for role in roles}

    def save_adapters(self, out_dir: Path) -> None:
        save_adapter(self.slm, out_dir / "adapters" / "slm")
        save_adapter(self.llm, out_dir / "adapters" / "llm")


def score(model, tokenizer, config: Config, questions: Sequence[Question]) -> Accuracy:
    """Multiple-choice accuracy with the config's evaluation settings."""
    return evaluate_multiple_choice(
        model, tokenizer, questions, config.eval.batch_size, config.data.max_length
    )


def evaluation_questions(config: Config) -> list[Question]:
    questions = load_questions(config.task, config.eval.split, config.data_dir)
    return questions[: config.eval.limit] if config.eval.limit else questions
