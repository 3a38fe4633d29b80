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
from fedcollm.config import Config, ConfigError
from fedcollm.data import DataSplit

# Keys that may change between the interrupted run and its resumption.
RESUMABLE_CHANGES = {
    "rounds",
    "federation.round_timeout",
    "federation.client_cpus",
    "federation.client_gpus",
}


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
    return {"aux": list(split.aux), "clients": [list(c) for c in split.clients]}


def save_checkpoint(
    directory: Path, server_round: int, server: CoTuningServer, rows: list[dict[str, Any]]
) -> Path:
    """Write the state after `server_round` (its evaluation included); keeps only the latest."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "round": server_round,
        "config": server.config.to_dict(),
        "server": server.state_dict(),
        # Only torch's generator drives randomness in a run (numpy uses seeded generators).
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "split": _split_dict(server.split),
        "rows": rows,
    }
    path = directory / f"round-{server_round}.pt"
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    _atomic_write(directory / "latest", lambda tmp: tmp.write_text(f"{server_round}\n"))
    for old in directory.glob("round-*.pt"):
        if old != path:
            old.unlink()
    return path


def latest_round(directory: Path) -> int | None:
    latest = directory / "latest"
    return int(latest.read_text()) if latest.is_file() else None


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Never start over a run that left a checkpoint, nor resume one that left none."""
    server_round = latest_round(out_dir / "checkpoint")
    if resume and server_round is None:
        raise ConfigError(
            f"--resume: {out_dir} holds no checkpoint; run without --resume to start afresh"
        )
    if not resume and server_round is not None:
        raise ConfigError(
            f"{out_dir} holds a checkpoint of an earlier run (round {server_round}); pass "
            "--resume to continue it, or choose another --out"
        )


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def load_checkpoint(directory: Path, config: Config) -> Checkpoint:
    """The latest checkpoint, checked against `config`; ConfigError says what differs."""
    server_round = latest_round(directory)  # check_out_dir has made sure that there is one
    path = directory / f"round-{server_round}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)  # any device saved it
    changed = [
        k for k in _differences(state["config"], config.to_dict()) if k not in RESUMABLE_CHANGES
    ]
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the checkpointed run in {', '.join(changed)}; "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change, or use another --out"
        )
    return Checkpoint(server_round, state["rows"], state)


def restore(server: CoTuningServer, checkpoint: Checkpoint) -> None:
    """Put the server back in the state it had after the checkpointed round."""
    state = checkpoint.state
    if state["split"] != _split_dict(server.split):
        raise ConfigError(
            "--resume: the training data no longer splits as it did in the checkpointed "
            "run (the data files changed); start afresh with another --out"
        )
    server.load_state_dict(state["server"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
