"""One experiment = one TOML file, validated before any model is loaded.

Every table is a dataclass (schema.py); a TOML key that is not a field, a value of the wrong
type or a value outside its allowed set is a `ConfigError` naming the key and what is allowed
(parse.py); values that make no sense together are refused the same way (checks.py).
Defaults follow the same authors' FedMKT paper where FedCoLLM leaves a value unstated
(LoRA r 8 / alpha 16 / dropout 0.05, AdamW betas (0.9, 0.95), weight decay 0.1, clipping 1.0,
lambda 1, T 1, one local epoch); see docs/CONFIG.md for the reasons.
"""

from fedcollm.config.checks import MAX_NOISE_MULTIPLIER, NOISE_PEAK_SDS, TRACKERS
from fedcollm.config.clients import (
    client_profile,
    client_slm,
    profile_slm,
    sampled_clients,
    slm_members,
)
from fedcollm.config.loading import apply_overrides, config_from_dict, load_config, parse_override
from fedcollm.config.schema import (
    ClientConfig,
    ClientProfile,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PrivacyConfig,
    TinyModel,
    differences,
)

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "NOISE_PEAK_SDS",
    "TRACKERS",
    "ClientConfig",
    "ClientProfile",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PrivacyConfig",
    "TinyModel",
    "apply_overrides",
    "client_profile",
    "client_slm",
    "config_from_dict",
    "differences",
    "load_config",
    "parse_override",
    "profile_slm",
    "sampled_clients",
    "slm_members",
]
