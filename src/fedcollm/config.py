"""One experiment = one TOML file, validated before any model is loaded.

Every table below is a dataclass; a TOML key that is not a field, a value of the wrong type
or a value outside its allowed set is a `ConfigError` naming the key and what is allowed.
Defaults follow the same authors' FedMKT paper where FedCoLLM leaves a value unstated
(LoRA r 8 / alpha 16 / dropout 0.05, AdamW betas (0.9, 0.95), weight decay 0.1, clipping 1.0,
lambda 1, T 1, one local epoch); see docs/CONFIG.md for the reasons.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcollm.registry import AGGREGATIONS, CROSS_VOCABULARY, DISTANCES
from fedcollm.seeds import MAX_SEED


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


# Positive integers and fractions that would make a run meaningless if zero or negative.
_POSITIVE = {
    "rounds",
    "num_clients",
    "lora.r",
    "lora.alpha",
    "data.max_length",
    "client.batch_size",
    "client.local_epochs",
    "client.speed",
    "distill.batch_size",
    "eval.batch_size",
    "client.lr",
    "distill.slm_lr",
    "distill.llm_lr",
    "distill.kd_temperature",
    "data.dirichlet_alpha",
    "federation.client_cpus",
    "federation.round_timeout",
    "federation.min_clients",
    "federation.secagg_clipping_range",
}
_NON_NEGATIVE = {
    "data.train_limit",
    "client.max_steps",
    "client.deadline_s",
    "distill.kd_steps",
    "distill.top_k",
    "eval.limit",
    "eval.max_length",
    "eval.every",
    "distill.kd_weight",
    "optim.weight_decay",
    "optim.max_grad_norm",
    "lora.dropout",
    "federation.max_update_norm",
    "federation.client_gpus",
    "federation.secagg_max_weight",
    "federation.clients_per_round",
    "privacy.clip_norm",
    "privacy.noise_multiplier",
    "privacy.max_epsilon",
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check one value against its field type; return it in that type."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise wrong
        return list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if not math.isfinite(value):  # TOML has nan and inf; no setting means either
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise wrong
    if not isinstance(value, tp):
        raise wrong
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in fields:
            allowed = ", ".join(prefix + f for f in fields)
            raise ConfigError(f"unknown key '{key}'; allowed here: {allowed}")
        tp = hints[name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):  # [[table]]: each a table, inheriting keys
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{key}: expected tables [[{key}]], got {value!r}")
            inherited = {k: values[k] for k in item.INHERITED if k in values}
            kwargs[name] = [
                _build(item, {**inherited, **v}, f"{key}[{i}].") for i, v in enumerate(value)
            ]
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
        elif "registry" in fields[name].metadata:  # a name of a registered member
            registry = fields[name].metadata["registry"]
            if not isinstance(value, str) or value not in registry:
                raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {registry}")
            kwargs[name] = value
        else:
            kwargs[name] = _convert(key, value, tp)
    return cls(**kwargs)


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_meaning(config: Config) -> None:
    """Cross-field checks: values that are well typed but make no sense together."""
    for key in _POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {_get(config, key)}")
    for key in _NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {_get(config, key)}")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"seed: must be in [0, {MAX_SEED}] (2**32 - 1), got {config.seed}")
    if config.data.max_length < 2:
        raise ConfigError(
            f"data.max_length: must be at least 2 (a prompt token and an answer token), "
            f"got {config.data.max_length}"
        )
    for role in ("llm", "slm"):
        _check_device(f"{role}.device", _get(config, f"{role}.device"))
        _check_quantization(f"{role}.quantization", _get(config, f"{role}.quantization"))
    if not 0 <= config.data.aux_fraction < 1:
        raise ConfigError(
            f"data.aux_fraction: must be in [0, 1) (0: the paper's 1/(K+1)), got "
            f"{config.data.aux_fraction}"
        )
    if not 0 <= config.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {config.lora.dropout}")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= _get(config, key) < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {_get(config, key)}")
    by_field = config.data.partition == "by_field" or (
        config.data.partition == "dirichlet" and config.data.dirichlet_by == "field"
    )
    if by_field and not config.data.partition_field.strip():
        raise ConfigError(
            "data.partition_field: empty; name the field of the task's rows to partition by "
            '(e.g. "subject_name" for medmcqa)'
        )
    if config.federation.min_clients > config.num_clients:
        raise ConfigError(
            f"federation.min_clients: {config.federation.min_clients} is more than "
            f"num_clients = {config.num_clients}; no round could ever complete"
        )
    sampled = config.federation.clients_per_round
    if sampled > config.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: {sampled} is more than num_clients = "
            f"{config.num_clients}; sample at most all of them (0 means all)"
        )
    if sampled and config.federation.min_clients > sampled:
        raise ConfigError(
            f"federation.min_clients: {config.federation.min_clients} is more than "
            f"federation.clients_per_round = {sampled}; no round could ever complete"
        )
    _check_profiles(config)
    if config.federation.secure_aggregation:
        _check_secure_aggregation(config)
    _check_privacy(config)
    _check_tracking(config)


def _check_quantization(key: str, quantization: str) -> None:
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f'{key} = "{quantization}" needs bitsandbytes, which is not installed here: '
            f'pip install "bitsandbytes==0.50.2" (make test installs it), or set "none"'
        )


def _check_device(key: str, device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(
            f'{key}: {device!r} is not a device; use "auto", "cpu", "cuda" or "cuda:N"'
        )


def _check_profiles(config: Config) -> None:
    """Each profile names clients that exist, each client in one profile at most, and a
    budget and a speed that can run."""
    owner: dict[int, int] = {}
    for i, profile in enumerate(config.client.profiles):
        key = f"client.profiles[{i}]"
        if not profile.clients:
            raise ConfigError(f"{key}.clients: empty; list the partitions this profile holds")
        for k in profile.clients:
            if not 0 <= k < config.num_clients:
                last = config.num_clients - 1
                raise ConfigError(f"{key}.clients: {k} is not a client; partitions are 0..{last}")
            if k in owner:
                raise ConfigError(
                    f"{key}.clients: client {k} is already in client.profiles[{owner[k]}]; "
                    "give each client one profile"
                )
            owner[k] = i
        for name in ("local_epochs", "batch_size", "speed"):
            if getattr(profile, name) <= 0:
                raise ConfigError(
                    f"{key}.{name}: must be greater than 0, got {getattr(profile, name)}"
                )
        if profile.max_steps < 0:
            raise ConfigError(f"{key}.max_steps: must be 0 or more, got {profile.max_steps}")
        if not 0 <= profile.lora_r <= config.lora.r:
            raise ConfigError(
                f"{key}.lora_r: {profile.lora_r} is not a rank up to lora.r = {config.lora.r} "
                "(theta's rank, the largest); raise lora.r or lower the profile's"
            )
        slm = profile_slm(config, profile, f"{key}.slm.")
        _check_device(f"{key}.slm.device", slm.device)
        _check_quantization(f"{key}.slm.quantization", slm.quantization)
    _check_groups(config)
    ranks = {p.lora_r for p in config.client.profiles if p.lora_r and p.lora_r < config.lora.r}
    if ranks and config.lora.variant == "ffa":
        raise ConfigError(
            'client.profiles: lora_r below lora.r needs lora.variant = "lora" (FFA-LoRA\'s '
            "frozen A would keep the slices a client does not hold alive)"
        )
    if config.lora.rank_aggregation == "flexlora":
        if config.lora.variant == "ffa":
            raise ConfigError(
                'lora.rank_aggregation = "flexlora" refactorises B A: it needs lora.variant '
                '= "lora"'
            )
        if config.federation.secure_aggregation:
            raise ConfigError(
                'lora.rank_aggregation = "flexlora" needs every client\'s product B_k A_k, '
                'which secure aggregation hides; use "slices" or secure_aggregation = false'
            )
    if config.client.late != "wait" and not config.client.deadline_s:
        raise ConfigError(
            f'client.late = "{config.client.late}" needs a deadline: set client.deadline_s'
        )


def _check_groups(config: Config) -> None:
    """Clients of several SLMs (algorithm/groups.py): what their distillation and their
    transport do not support yet is refused before anything loads."""
    members = slm_members(config)
    if len(members) < 2:
        return
    if config.distill.schedule != "alternating":
        raise ConfigError(
            f'distill.schedule = "{config.distill.schedule}": clients of several SLMs '
            '(client.profiles\' slm) distil with the "alternating" schedule only'
        )
    if config.federation.secure_aggregation and config.privacy.enabled:
        raise ConfigError(
            "privacy.clip_norm: DP under secure aggregation is not yet for clients of several "
            "SLMs (client.profiles' slm): each group's noise would be a share of the whole "
            "federation's; aggregate plainly, or give every client one SLM"
        )
    for model, clients in members if config.federation.secure_aggregation else []:
        if len(clients) < 2:
            raise ConfigError(
                f"client.profiles: the SLM {model.name!r} is held by client {clients[0]} "
                "alone, and secure aggregation would reveal its update as its group's mean; "
                "give the group two clients or more"
            )
    if config.federation.secure_aggregation and config.client.aggregation == "fednova":
        raise ConfigError(
            'client.aggregation = "fednova" under secure aggregation is not yet for clients '
            "of several SLMs (client.profiles' slm); aggregate plainly or use another rule"
        )


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

    return _build(ModelConfig, merged(dataclasses.asdict(config.slm), profile.slm), key)


TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # name -> the package it needs


def _check_tracking(config: Config) -> None:
    import importlib.util

    for name in config.tracking:
        if name not in TRACKERS:
            raise ConfigError(
                f"tracking: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"tracking: {name!r} needs the {TRACKERS[name]} package; install it with "
                "pip install 'fedcollm[tracking]', or drop it from tracking"
            )
    if len(set(config.tracking)) < len(config.tracking):
        raise ConfigError(f"tracking: a tracker is named twice in {config.tracking}")


def sampled_clients(config: Config) -> int:
    """The clients each round takes: `federation.clients_per_round`, else all of them."""
    return config.federation.clients_per_round or config.num_clients


# sigma beyond this adds nothing but overflow: one round at 1000 spends epsilon 0.006.
MAX_NOISE_MULTIPLIER = 1000.0


def _check_privacy(config: Config) -> None:
    privacy = config.privacy
    if not 0 < privacy.target_delta < 1:
        raise ConfigError(f"privacy.target_delta: must be in (0, 1), got {privacy.target_delta}")
    if privacy.withhold_metrics:
        if config.eval.clients:
            raise ConfigError(
                "privacy.withhold_metrics: the clients' own scores are among what it "
                "withholds; set eval.clients = false"
            )
        if config.client.aggregation != "uniform":
            raise ConfigError(
                f"privacy.withhold_metrics: client.aggregation = "
                f'"{config.client.aggregation}" weighs by the sizes or steps it withholds; '
                'use "uniform"'
            )
    if not privacy.enabled:
        for key in ("noise_multiplier", "max_epsilon"):
            if getattr(privacy, key):
                raise ConfigError(
                    f"privacy.{key} is set but privacy.clip_norm is 0; DP needs a clipping "
                    "bound: set privacy.clip_norm (e.g. 0.1; each row's update_norm shows "
                    "the clients' update sizes)"
                )
        return
    if config.client.aggregation != "uniform":
        raise ConfigError(
            'client.aggregation: must be "uniform" with privacy.clip_norm (a client\'s '
            "self-reported size would scale its weight past the clipping bound)"
        )
    if privacy.max_epsilon and not privacy.noise_multiplier:
        raise ConfigError(
            "privacy.max_epsilon is set but privacy.noise_multiplier is 0: without noise "
            "epsilon is infinite from the first round; set privacy.noise_multiplier"
        )
    if privacy.noise_multiplier > MAX_NOISE_MULTIPLIER:
        raise ConfigError(
            f"privacy.noise_multiplier: at most {MAX_NOISE_MULTIPLIER:g}, got "
            f"{privacy.noise_multiplier:g}; noise that large only drowns theta (epsilon "
            f"is already near 0 at {MAX_NOISE_MULTIPLIER:g})"
        )
    if privacy.max_epsilon:
        from fedcollm import dp

        first = dp.epsilon(
            privacy.noise_multiplier,
            privacy.target_delta,
            config.num_clients,
            sampled_clients(config),
            1,
        )
        if first > privacy.max_epsilon:
            raise ConfigError(
                f"privacy.max_epsilon = {privacy.max_epsilon:g} is below what the first round "
                f"alone spends (epsilon {first:.3g} at delta {privacy.target_delta:g}); raise "
                "privacy.max_epsilon or privacy.noise_multiplier"
            )


# Standard deviations of Gaussian noise that no value of an adapter is expected to pass:
# P(|Z| > 7) = 2.6e-12, so among 10^8 values one passes with probability 3e-4.
NOISE_PEAK_SDS = 7


def _check_secure_aggregation(config: Config) -> None:
    federation = config.federation
    if not AGGREGATIONS[config.client.aggregation].secure:
        raise ConfigError(
            f"client.aggregation: {config.client.aggregation!r} is not a weighted mean of the "
            "clients' uploads, which is all SecAgg+ computes; choose another rule, or set "
            "federation.secure_aggregation = false"
        )
    if federation.adapter_dtype != "float32":
        raise ConfigError(
            "federation.adapter_dtype: SecAgg+ quantises float32 values (float16 overflows "
            'there); set it to "float32" with secure_aggregation'
        )
    if config.client.late == "drop":
        raise ConfigError(
            'client.late = "drop" is not available with secure_aggregation (a dropped client '
            'would still have to take part in the masking); use "partial" or "wait"'
        )
    if federation.min_clients < 2:
        raise ConfigError(
            "federation.min_clients: must be at least 2 with secure_aggregation; the mean of "
            "one client's update is that update"
        )
    privacy = config.privacy
    if privacy.clip_norm and privacy.noise_multiplier:
        # Each client masks theta + its clipped update (norm <= C, so no value beyond C) +
        # its noise share N(0, s^2), s = sigma C / sqrt(min_clients); SecAgg+ would clip a
        # value beyond the range silently, so a client refuses to send it, and with the
        # range too small every client refuses every round.
        share = privacy.noise_multiplier * privacy.clip_norm / math.sqrt(federation.min_clients)
        peak = privacy.clip_norm + NOISE_PEAK_SDS * share
        if peak > federation.secagg_clipping_range:
            raise ConfigError(
                f"federation.secagg_clipping_range = {federation.secagg_clipping_range:g} is "
                f"below what a client's noised update reaches (about {peak:.2g}: clip_norm "
                f"{privacy.clip_norm:g} + {NOISE_PEAK_SDS} x its noise share's std "
                f"{share:.2g}); set it to {math.ceil(peak)} or more on every party"
            )
    if not 0 < federation.secagg_reconstruction_threshold <= 1:
        raise ConfigError(
            "federation.secagg_reconstruction_threshold: a share of the clients in (0, 1], "
            f"got {federation.secagg_reconstruction_threshold}"
        )


def config_from_dict(values: dict[str, Any]) -> Config:
    config = _build(Config, values)
    _check_meaning(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set client.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        table = values
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a table")
        table[path[-1]] = value
    return values


def load_config(
    path: str | Path, overrides: list[str] | None = None, data_dir: str | None = None
) -> Config:
    """Read, override and validate a TOML config; raises ConfigError on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the TOML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        # utf-8-sig: a byte-order mark, which some editors write, is not part of the TOML.
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8"
        ) from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    values = apply_overrides(values, overrides or [])
    if data_dir is not None:
        values["data_dir"] = data_dir
    task = values.get("task")
    if isinstance(task, str) and task.endswith((".yaml", ".yml")):
        # Ray workers and resumed runs may start elsewhere: the task file's absolute path.
        values["task"] = str(Path(task).expanduser().resolve())
    return config_from_dict(values)
