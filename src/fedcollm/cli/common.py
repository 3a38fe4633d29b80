"""What every command shares: the errors that are the user's to fix, the preflight, and
the registry models fetched once before anything loads them."""

from __future__ import annotations

from fedcollm.config import Config, ConfigError
from fedcollm.errors import DataError, ModelError, RegistryError

USER_ERRORS = (ConfigError, DataError, ModelError, RegistryError)


def check_run(config: Config, simulated: bool = True) -> Config:
    from fedcollm.preflight import check_run as preflight

    return preflight(config, simulated)


def prepare_models(config) -> None:
    """Fetch and convert registry models once, before any server or client loads them."""
    from fedcollm.models import model_path
    from fedcollm.preflight import model_specs

    for _, spec in model_specs(config):
        if spec.name != "tiny":
            model_path(spec.name)
