"""A checkpoint after every round, so that a crashed run continues where it stopped.

What a round leaves that the next one needs: theta and omega, the LLM's optimiser state
(the only optimiser that lives across rounds), the torch RNG state, the data split (to
check that the data did not change) and the metrics so far. Clients keep no state between
rounds and derive their seeds from the round number, so nothing of theirs is saved.

Layout: `<out>/checkpoint/round-<r>.pt`, written to a temporary file and renamed into
place, then `latest` (the round number) is replaced the same way; a crash at any moment
leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import Config, ConfigError, differences
from fedcollm.data import DataSplit

# Keys that may change between the interrupted run and its resumption.
RESUMABLE_CHANGES = {
    "rounds",
    "federation.round_timeout",
    "federation.client_cpus",
    "federation.client_gpus",
    # A larger privacy budget continues the same accountant (its state is checkpointed).
    "privacy.max_epsilon",
    # What is recorded, not what is computed.
    "eval.every",
    "tracking",
}


class CheckpointError(ConfigError):
    """A checkpoint or output directory (`--out`) that cannot be used as it is."""


@dataclass
class Checkpoint:
    server_round: int
    rows: list[dict[str, Any]]
    state: dict[str, Any]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _split_dict(split: DataSplit) -> dict[str, Any]:
    return {
        "aux": list(split.aux),
        "clients": [list(c) for c in split.clients],
        "fingerprint": split.fingerprint,
    }


def save_checkpoint(
    directory: Path,
    server_round: int,
    server: CoTuningServer,
    rows: list[dict[str, Any]],
    evaluation_fingerprint: str = "",
) -> Path:
    """Write the state after `server_round` (its evaluation included); keeps only the latest.
    `evaluation_fingerprint`: the digest of the questions the rows were scored on."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "round": server_round,
        "config": server.config.to_dict(),
        "server": server.state_dict(),
        # Only torch's generator drives randomness in a run (numpy uses seeded generators).
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "split": _split_dict(server.split),
        "evaluation": evaluation_fingerprint,
        "rows": rows,
    }
    path = directory / f"round-{server_round}.pt"
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    _atomic_write(directory / "latest", lambda tmp: tmp.write_text(f"{server_round}\n"))
    for old in directory.glob("round-*.pt"):
        if old != path:
            old.unlink()
    return path


def _start_afresh(directory: Path) -> str:
    return f"delete {directory} to start afresh, or choose another --out"


def latest_round(directory: Path) -> int | None:
    """The round the checkpoint in `directory` holds, None when there is none."""
    latest = directory / "latest"
    if not latest.exists():
        return None
    try:
        text = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{latest} cannot be read ({err}); {_start_afresh(directory)}"
        ) from None
    if not text.isdigit():
        raise CheckpointError(
            f"{latest} is damaged ({text[:20]!r} is not a round number); "
            + _start_afresh(directory)
        )
    if not (directory / f"round-{text}.pt").is_file():
        raise CheckpointError(
            f"{latest} names round {text}, but {directory / f'round-{text}.pt'} is missing; "
            + _start_afresh(directory)
        )
    return int(text)


STATE_KEYS = {"round", "config", "server", "torch_rng", "cuda_rng", "split", "rows"}


def load_checkpoint(directory: Path, config: Config) -> Checkpoint:
    """The latest checkpoint, checked against `config`; CheckpointError if it is damaged,
    ConfigError saying what differs if it is of another run."""
    server_round = latest_round(directory)
    if server_round is None:
        raise CheckpointError(f"{directory} holds no checkpoint; run without --resume")
    path = directory / f"round-{server_round}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # any device saved it
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file, whatever it says
        raise CheckpointError(
            f"{path} is damaged ({type(err).__name__}); {_start_afresh(directory)}"
        ) from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise CheckpointError(
            f"{path} is not a checkpoint of this version of fedcollm; {_start_afresh(directory)}"
        )
    changed = [k for k in differences(state["config"], config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the checkpointed run in {', '.join(changed)}; "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change, or use another --out"
        )
    return Checkpoint(server_round, state["rows"], state)


def check_same_data(checkpoint: Checkpoint, split: DataSplit) -> None:
    """The training data must be what the checkpointed run split, row for row."""
    if checkpoint.state["split"] != _split_dict(split):
        raise ConfigError(
            "--resume: the training data differ from the checkpointed run's (the data files "
            "changed); restore them, or start afresh with another --out"
        )


def check_same_evaluation(checkpoint: Checkpoint, fingerprint: str) -> None:
    """The evaluation questions must be those the checkpointed rows were scored on: one
    metrics.jsonl never mixes scores against two versions of the answers. (A checkpoint
    that recorded none predates this check.)"""
    saved = checkpoint.state.get("evaluation")
    if saved and saved != fingerprint:
        raise ConfigError(
            "--resume: the evaluation questions differ from those the checkpointed run was "
            "scored on (the validation data changed); restore them, or start afresh with "
            "another --out"
        )


def restore(server: CoTuningServer, checkpoint: Checkpoint) -> None:
    """Put the server back in the state it had after the checkpointed round."""
    check_same_data(checkpoint, server.split)
    server.load_state_dict(checkpoint.state["server"])
    torch.set_rng_state(checkpoint.state["torch_rng"])
    if checkpoint.state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint.state["cuda_rng"])
