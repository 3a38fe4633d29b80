"""The configuration's tables: one dataclass per TOML table, with the defaults and the
reasons for them (docs/CONFIG.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fedcollm.registry import AGGREGATIONS, CROSS_VOCABULARY, DISTANCES


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass
class TinyModel:
    """A randomly initialised Llama-style model built in code (tests, smoke runs)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # "bytes": GPT-2-style byte-level tokens; "pieces": SentencePiece-style word pieces with
    # byte fallback, another family's tokenizer (cross-family runs on tiny models).
    tokenizer: Literal["bytes", "pieces"] = "bytes"


@dataclass
class ModelConfig:
    # "tiny" (built from `tiny` below), a registry short name, a local directory, or a hub id.
    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "auto" (a CUDA GPU when PyTorch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # "nf4" (4-bit NormalFloat, double quantisation, bf16 compute: QLoRA's) or "int8": the
    # frozen base weights through bitsandbytes; the adapter stays float32. "none": `dtype`.
    quantization: Literal["none", "nf4", "int8"] = "none"
    # "bfloat16": training, distillation and target-loss forwards under bf16 autocast (the
    # multiple-choice scorer stays in `dtype`); the adapter and its optimiser state stay
    # float32. CPUs and Ampere-or-later GPUs run it.
    autocast: Literal["none", "bfloat16"] = "none"
    # Recompute activations in the backward pass instead of keeping them (less memory,
    # about a third more compute).
    gradient_checkpointing: bool = False
    tiny: TinyModel = field(default_factory=TinyModel)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Empty: picked per architecture (attention projections; see models.py).
    target_modules: list[str] = field(default_factory=list)
    # "lora": A and B trained, theta holds both. "ffa" (FFA-LoRA, Sun et al. 2024): A frozen
    # at the shared seeded init, only B trained and sent; the mean of the clients' B A is
    # then exactly (mean of B) A, secure aggregation and DP included; half of theta or less goes.
    variant: Literal["lora", "ffa"] = "lora"
    # With clients of several ranks (client.profiles' lora_r; r above is theta's, the
    # largest): "slices" averages each rank slice over the clients that hold it (HetLoRA);
    # "flexlora" averages the clients' products B A and refactorises them by truncated SVD
    # (FlexLoRA; not with secure aggregation).
    rank_aggregation: Literal["slices", "flexlora"] = "slices"


@dataclass
class DataConfig:
    # 0 keeps the whole training split; N keeps a seeded sample of N rows.
    train_limit: int = 0
    # The share of the (kept) training rows that is the server's D_a; 0: an equal part,
    # 1/(K+1), as in the paper (one fifth with its K = 4). The clients share the rest.
    aux_fraction: float = 0.0
    # "iid": the training split cut into K+1 equal parts (D_a, D_1..D_K), as in the paper.
    # "dirichlet": D_a as before, the rest spread over clients by Dirichlet(alpha) per group.
    # "by_field": D_a as before, each value of partition_field held by one client (natural
    # partitions: MedMCQA's subject_name, a hospital per group of specialties).
    partition: Literal["iid", "dirichlet", "by_field"] = "iid"
    dirichlet_alpha: float = 0.5
    # Groups of the Dirichlet split: "label", the answer's position (first choice, second...:
    # ARC's "1" and "A" are one group); "field", the rows' partition_field.
    dirichlet_by: Literal["label", "field"] = "label"
    # A field of the task's rows, or a Jinja template over them as in task files (ARC's exam:
    # "{{ id.split('_')[0] }}"); for by_field, and for dirichlet_by = "field".
    partition_field: str = ""
    max_length: int = 256
    # How a prompt reaches the model: "plain", as lm-eval builds it (scores comparable with
    # lm-eval's, and any model works, base or instruction-tuned); "chat", inside the
    # tokenizer's chat template (the user's turn; the answer is the assistant's).
    prompt_format: Literal["plain", "chat"] = "plain"


@dataclass
class OptimConfig:
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class ClientProfile:
    """A group of clients with their own compute: a `[[client.profiles]]` table. A key it
    leaves out is the `[client]` table's."""

    clients: list[int] = field(default_factory=list)  # partitions
    name: str = ""
    local_epochs: int = 1
    max_steps: int = 0
    batch_size: int = 4
    speed: float = 1.0
    # This group's LoRA rank, at most lora.r (theta's); 0: lora.r (algorithm/ranks.py).
    lora_r: int = 0
    # This group's SLM: the [slm] keys it changes, e.g. {name = "smollm2-135m"}; empty: the
    # [slm] table's. Clients of one SLM form a group with its own theta (algorithm/groups.py).
    slm: dict[str, Any] = field(default_factory=dict)

    INHERITED = ("local_epochs", "max_steps", "batch_size", "speed")


@dataclass
class ClientConfig:
    local_epochs: int = 1
    # 0: no cap; N: at most N optimiser steps per round (a step budget).
    max_steps: int = 0
    batch_size: int = 4
    lr: float = 3e-4
    # The paper averages with 1/K; "num_examples" weights by client data size (FedAvg);
    # "fednova" normalises each update by its steps (FedNova). More rules: register one
    # (algorithm/aggregation.py).
    aggregation: str = field(default="uniform", metadata={"registry": AGGREGATIONS})
    # Heterogeneous compute (algorithm/compute.py). A client's speed in optimiser steps per
    # second of the round's clock; `profiles` give groups of clients their own budget and
    # speed.
    speed: float = 1.0
    profiles: list[ClientProfile] = field(default_factory=list)
    # 0: no deadline. D: the round closes D seconds after the broadcast, on the "simulated"
    # clock (steps / speed: deterministic) or the "wall" clock (a deployment's real time).
    deadline_s: float = 0.0
    clock: Literal["simulated", "wall"] = "simulated"
    # A client that cannot finish its budget by the deadline: "wait" for it, "drop" it (its
    # update is not aggregated), or take its "partial" work (the steps done by then).
    late: Literal["wait", "drop", "partial"] = "wait"


@dataclass
class DistillConfig:
    enabled: bool = True
    # R: optimiser steps per round on D_a; 0 means one pass over D_a.
    kd_steps: int = 0
    batch_size: int = 4
    slm_lr: float = 3e-4
    llm_lr: float = 3e-5
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    # Who learns from whom: "mutual" (Algorithm 1: each model's loss is its cross-entropy plus
    # kd_weight times its distance to the other); "llm_to_slm" (only the SLM has the distance
    # term) or "slm_to_llm" (only the LLM has it). The other model still trains on D_a with its
    # cross-entropy, so the ablation changes the direction of knowledge and nothing else.
    direction: Literal["mutual", "llm_to_slm", "slm_to_llm"] = "mutual"
    # forward: KL(teacher || student); reverse: KL(student || teacher); symmetric: their mean.
    # More distances: register one (algorithm/distances.py).
    kd_direction: str = field(default="forward", metadata={"registry": DISTANCES})
    # alternating: Algorithm 1 (SLM step, then LLM step toward the updated SLM, per batch);
    # simultaneous: per batch, both step toward the other's logits from before the step (one
    # SLM forward fewer); sequential: all SLM steps, then all LLM steps toward the final SLM.
    schedule: Literal["alternating", "simultaneous", "sequential"] = "alternating"
    # 0: full vocabulary (default). k > 0: KL over the teacher's top-k tokens only.
    top_k: int = 0
    # "eval": every teacher runs in eval mode, so LoRA dropout never reaches a teacher (with
    # dropout on, one more LLM forward per step, and under "simultaneous" one more SLM
    # forward). "shared": a model's train-mode student forward is also the other model's
    # teacher, dropout and all. Without dropout both are the same and cost the same.
    teacher_forward: Literal["eval", "shared"] = "eval"
    # Selective distillation (FedMKT's rule): "none" is Algorithm 1, every answer position
    # takes the distance term. "position": a model takes it only at the answer positions
    # where the other model's cross-entropy on the gold token is lower than its own;
    # "example": only on the examples where the other's mean cross-entropy over the answer
    # is lower. Read from the forward passes the step makes anyway.
    selection: Literal["none", "position", "example"] = "none"
    # When the LLM's and the SLM's tokenizers differ (they are compared at the answer
    # positions where both start a token): "map" carries the teacher's distribution onto the
    # student's vocabulary through a token map, then the KL above; "uld" is Universal Logit
    # Distillation (sorted probabilities, no map). One tokenizer: ignored, the KL as ever.
    cross_tokenizer: str = field(default="map", metadata={"registry": CROSS_VOCABULARY})


@dataclass
class EvalConfig:
    split: Literal["validation", "test"] = "validation"
    # 0: every question of the split.
    limit: int = 0
    # Which `limit` questions: "first" (lm-eval's --limit) or "random", one fixed draw of the
    # split that every seed and method shares (a file sorted by label makes "first" a skewed
    # sample: TFNS's first 100 validation tweets are 63% bullish, the split 20%).
    sample: Literal["first", "random"] = "first"
    batch_size: int = 16
    # Tokens of each (prompt, choice) pair, cut from the left as lm-eval cuts them; 0: the
    # model's context length, lm-eval's default (no prompt of the four tasks is cut then).
    max_length: int = 0
    # Each client also scores its own adapter after its last local update (final round).
    clients: bool = False
    # Score the LLM and the global SLM on rounds 0, N, 2N... and always the last; 0: the
    # last round only (a study that needs the final scores alone saves most of its time).
    every: int = 1

    def due(self, server_round: int, last: bool) -> bool:
        """Whether the LLM and the global SLM are scored after this round (`last`: the
        run's last round, which is always scored)."""
        return last or (self.every > 0 and server_round % self.every == 0)


@dataclass
class FederationConfig:
    # dtype of the adapter on the wire (bf16 is not accepted by Flower's ArrayRecord).
    adapter_dtype: Literal["float32", "float16"] = "float32"
    # CPUs each simulated client gets: clients run ceil(total_cpus / client_cpus) at a time.
    client_cpus: int = 1
    # GPUs (fractions allowed) each simulated client gets; with 0 Ray hides the GPUs from the
    # clients, so they tune on the CPU whatever slm.device says.
    client_gpus: float = 0.0
    # Seconds the server waits for client replies each round.
    round_timeout: float = 3600.0
    # A round goes on with the clients that answered if at least this many sent a valid
    # update; with fewer it is skipped (theta unchanged, no distillation).
    min_clients: int = 1
    # Reject a client update whose L2 distance from the broadcast theta exceeds this
    # (0: no bound). Each round's metrics list every client's update_norm to tune it by.
    max_update_norm: float = 1000.0
    # Client uploads go through Flower's SecAgg+: the server gets only the mean of the client
    # adapters, so it checks that mean instead of each update (docs/SECURITY.md).
    secure_aggregation: bool = False
    # SecAgg+ clips values to [-c, c] and quantises them on 2**22 levels: c = 1 gives steps
    # of 4.8e-7, far below LoRA values. A client whose update exceeds c does not send it.
    secagg_clipping_range: float = 1.0
    # Share of a client's peers that must answer to rebuild its masks if it drops out.
    secagg_reconstruction_threshold: float = 0.6
    # With client.aggregation = "num_examples": the largest |D_k| any client may hold (SecAgg+
    # scales weights by it). 0: the largest partition of the server's own split, which is
    # right in simulation; deployed nodes with their own data need it set.
    secagg_max_weight: int = 0
    # Clients sampled each round, uniformly without replacement and seeded (recorded in each
    # metrics row); 0: all num_clients every round, as in the paper.
    clients_per_round: int = 0


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg on theta; docs/PRIVACY.md)."""

    # L2 bound on each client's update theta_k - theta; 0: no clipping, no DP.
    clip_norm: float = 0.0
    # Gaussian noise of standard deviation noise_multiplier * clip_norm on the clipped sum;
    # 0: clipping only (no guarantee, epsilon is infinite).
    noise_multiplier: float = 0.0
    target_delta: float = 1e-5
    # Stop before a round that would take epsilon past this (0: no limit).
    max_epsilon: float = 0.0
    # "system": noise keyed from the OS's CSPRNG, as DP needs. "seeded": keyed from the
    # config's seed, so a run repeats bit for bit; anyone who knows the seed can subtract the
    # noise, so it guarantees nothing (tests and comparisons only).
    noise_source: Literal["system", "seeded"] = "system"
    # true: clients send nothing that depends on their data beside the (noised) adapter:
    # no training loss, size, step count or timing, no scores of their own adapter; only
    # their partition, the bytes they received and whether the deadline dropped them.
    withhold_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0


@dataclass
class Config:
    seed: int = 0
    rounds: int = 2
    num_clients: int = 3
    # A built-in task (`fedcollm tasks` lists them) or the path of an lm-eval task file.
    task: str = "arc_easy"
    # Where a task's relative data_files are (the built-in tasks: <task>/<split>.jsonl in
    # hub layout); empty: beside the task file.
    data_dir: str = ""
    llm: ModelConfig = field(default_factory=ModelConfig)
    slm: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Per-round metrics also to "tensorboard" (<out>/tensorboard) and/or "mlflow"
    # (<out>/mlflow.db, or MLFLOW_TRACKING_URI); the extra `pip install fedcollm[tracking]`.
    tracking: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def differences(saved: dict[str, Any], config: Config) -> list[str]:
    """The dotted keys in which `config` differs from a config saved by `to_dict`. A key the
    saved config lacks was added to fedcollm after it was saved, and ran as its default
    does now: it differs only if set otherwise."""

    def walk(a: dict[str, Any], b: dict[str, Any], defaults: dict[str, Any], prefix: str):
        for key in sorted(set(a) | set(b)):
            old, new = a.get(key, defaults.get(key)), b.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                yield from walk(old, new, defaults.get(key) or {}, f"{prefix}{key}.")
            elif old != new:
                yield prefix + key

    return list(walk(saved, config.to_dict(), Config().to_dict(), ""))
