"""A run's output directory (`--out`): everything checked about it before anything is written
there, in one place, and held for the run's lifetime so that no second run writes into it.

`prepare_run` is what every way of starting a run goes through (`fedcollm run`, an
experiment's federated runs, `flwr run`'s ServerApp): the directory is writable and held, a
fresh run finds no checkpoint and a resumed one finds one of the same config, training data
and evaluation questions. The checkpoint is read here once and handed on.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from fedcollm.config import Config
from fedcollm.data import DataSplit, Question, evaluation_questions, training_split
from fedcollm.data.split import questions_digest
from fedcollm.tracking.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_same_data,
    check_same_evaluation,
    latest_round,
    load_checkpoint,
)
from fedcollm.tracking.trackers import check_trackers

# Output directories this process holds (resolved path -> the open directory's descriptor):
# a run and the server it starts in the same process hold one directory once.
_held: dict[Path, int] = {}


def check_writable(out_dir: Path, option: str = "--out", fix: str = "") -> None:
    """`out_dir` can be created and written to: said now, not after the models load. What
    the probe creates it removes again, so a refused run leaves nothing behind."""
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
        for directory in created:  # deepest first
            directory.rmdir()
    except OSError as err:
        raise CheckpointError(
            f"{option} {out_dir}: cannot write there ({err.strerror or err}); "
            f"{fix or 'choose another ' + option}"
        ) from None


def hold(out_dir: Path) -> None:
    """Take `out_dir` for this process (an advisory lock on the directory itself, which the
    kernel drops when the process ends, however it ends); CheckpointError when another
    process holds it. Creates the directory."""
    key = out_dir.resolve()
    if key in _held:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise CheckpointError(
            f"--out {out_dir}: another fedcollm process is writing there now; wait for it to "
            "end, or choose another --out"
        ) from None
    _held[key] = descriptor


def release(out_dir: Path) -> None:
    """Give `out_dir` back (a run that was refused after taking it)."""
    descriptor = _held.pop(out_dir.resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the last descriptor drops the lock


def check_out_dir(out_dir: Path, resume: bool) -> int | None:
    """Never start over a run that left a checkpoint, nor resume one that left none;
    returns the checkpointed round."""
    server_round = latest_round(out_dir / "checkpoint")
    if resume and server_round is None:
        raise CheckpointError(
            f"--resume: {out_dir} holds no checkpoint; run without --resume to start afresh"
        )
    if not resume and server_round is not None:
        raise CheckpointError(
            f"{out_dir} holds a checkpoint of an earlier run (round {server_round}); pass "
            "--resume to continue it, or choose another --out"
        )
    return server_round


@dataclass
class RunStart:
    """What a run found before it started: its evaluation questions and, when it resumes,
    the checkpoint it goes on from (read once, checked against the config and the data)."""

    out_dir: Path
    eval_questions: list[Question]
    created: bool  # whether preparing the run made `out_dir`
    checkpoint: Checkpoint | None = None

    @property
    def evaluation_fingerprint(self) -> str:
        return questions_digest(self.eval_questions)

    def abandon(self) -> None:
        """The run was refused after all: give the directory back as it was found."""
        release(self.out_dir)
        if self.created and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a refused run leaves nothing behind


def prepare_run(
    config: Config, out_dir: Path, resume: bool, split: DataSplit | None = None
) -> RunStart:
    """Every check of the output directory and of a resumed run's checkpoint, in one place;
    the directory is held from here on. `split`: the config's data split if already read."""
    check_writable(out_dir)
    start = RunStart(out_dir, [], created=not out_dir.exists())
    hold(out_dir)  # before the checks, so that two runs cannot both pass them
    try:
        check_out_dir(out_dir, resume)
        check_trackers(config.tracking, out_dir)
        start.eval_questions = evaluation_questions(config)
        if resume:
            start.checkpoint = load_checkpoint(out_dir / "checkpoint", config)
            check_same_data(start.checkpoint, split or training_split(config)[1])
            check_same_evaluation(start.checkpoint, start.evaluation_fingerprint)
    except Exception:
        start.abandon()
        raise
    return start
