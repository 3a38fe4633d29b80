"""Cross-field checks: values that are well typed but make no sense together, refused in
one line before any model loads."""

from __future__ import annotations

import importlib.util
import math
import re
from typing import Any

from fedcollm.config.clients import profile_slm, sampled_clients, slm_members
from fedcollm.config.schema import Config, ConfigError
from fedcollm.registry import AGGREGATIONS
from fedcollm.seeds import MAX_SEED

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


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_meaning(config: Config) -> None:
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


TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # name -> the package it needs


def _check_tracking(config: Config) -> None:
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
