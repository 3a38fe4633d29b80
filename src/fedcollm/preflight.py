"""What can be checked about a config before any model loads or any process starts: the
task and its files, the models it names. `config.py` checks each value on its own; this
module checks them against the data and the models they point at. `fedcollm run`,
`fedcollm experiment` and the deployed ServerApp call `check_run` first.
"""

from __future__ import annotations

from pathlib import Path

from fedcollm.config import Config, ConfigError
from fedcollm.data import TASKS
from fedcollm.data.synthetic import NAME as BUILT_IN_TASK
from fedcollm.models.registry import REGISTRY


def check_task(config: Config) -> None:
    if config.task not in TASKS:
        raise ConfigError(f"task: unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
    if config.data_dir and config.task != BUILT_IN_TASK:  # generated in code, no files
        task_dir = Path(config.data_dir).expanduser() / config.task
        if not (task_dir / "train.jsonl").is_file():
            raise ConfigError(
                f"data_dir: {task_dir / 'train.jsonl'} does not exist; point data_dir (or "
                f"--data-dir) at a directory holding {config.task}/train.jsonl"
            )
    if config.data.partition == "dirichlet" and config.data.dirichlet_by == "source":
        if config.task not in ("arc_easy", "arc_challenge"):
            raise ConfigError(
                f"data.dirichlet_by: {config.task} rows carry no question source; "
                'use "label" (only ARC ids name their source)'
            )


def check_model_names(config: Config) -> None:
    for role in ("llm", "slm"):
        name = getattr(config, role).name
        if name == "tiny" or name in REGISTRY:
            continue
        looks_local = name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()
        if looks_local and not (Path(name).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"{role}.name: {name!r} is not a model directory (no config.json there); "
                'give "tiny", a directory saved with save_pretrained, or a hub id'
            )


def check_run(config: Config) -> Config:
    """Every check that needs no model weights; raises ConfigError naming key and fix."""
    check_task(config)
    check_model_names(config)
    return config
