"""Failures in Flower's simulation engine: failing and hostile clients, a killed server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from flwr.superlink.grid import inmemory_grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from safetensors.torch import load_file

from fedcollm.algorithm.round import reference_rounds
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import load_config
from fedcollm.federation import processes
from fedcollm.federation.client_app import train
from fedcollm.federation.rounds import RoundBookkeeping
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_digest, get_adapter
from fedcollm.tracking.checkpoint import load_checkpoint
from fedcollm.tracking.metrics import read_metrics

pytestmark = pytest.mark.slow
TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
SMALL = ["rounds=2", "eval.limit=8"]


def hostile_client_app(config, niceness: Path) -> ClientApp:
    """Partition 1 crashes every round; partition 2 sends NaN; partition 0 behaves (and
    writes its process's niceness to `niceness`)."""
    app = ClientApp()

    @app.train()
    def _train(msg, context):
        partition = int(context.node_config["partition-id"])
        if partition == 0:
            niceness.write_text(str(os.nice(0)))
        if partition == 1:
            raise RuntimeError("disk full")
        reply = train(config, msg, context)
        if partition == 2:
            tensors = reply.content["arrays"].to_torch_state_dict()
            next(iter(tensors.values()))[0] = float("nan")
            reply.content["arrays"] = ArrayRecord(tensors)
        return reply

    return app


def test_a_round_completes_without_failed_and_rejected_clients(tmp_path, data_dir):
    config = load_config(TINY, data_dir=str(data_dir), overrides=SMALL)
    niceness = tmp_path / "client_niceness"
    rows = simulate(config, tmp_path / "run", client_app=hostile_client_app(config, niceness))
    # Clients run at this process's priority, not Ray's nice 15 (they starved beside work).
    assert int(niceness.read_text()) == os.nice(0)
    for row in rows[1:]:
        assert [c["partition"] for c in row["clients"]] == [0]
        assert len(row["dropped"]) == 1 and "disk full" in row["dropped"][0]["error"]
        assert [r["partition"] for r in row["rejected"]] == [2]
        assert "NaN or Inf" in row["rejected"][0]["reason"]
        assert "skipped" not in row and row["distilled_sha256"] != row["broadcast_sha256"]
    assert (tmp_path / "run" / "adapters" / "slm" / "adapter_model.safetensors").is_file()


def _run_until_round(data_dir, out: Path, overrides: list[str], done: int) -> subprocess.Popen:
    """`fedcollm run` in a session of its own (its process group is its pid), returned once
    its checkpoint of round `done` is written; what it prints goes to out/../<name>.log."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    log = (out.parent / f"{out.name}.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcollm.cli",
            "run",
            str(TINY),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            *sets,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    latest = out / "checkpoint" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == str(done)):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            log = (out.parent / f"{out.name}.log").read_text()
            pytest.fail(f"no round-{done} checkpoint:\n{log}")
        time.sleep(0.05)
    return process


def _alive_in_group(pgid: int) -> list[str]:
    """The processes left in a process group, zombies (already dead) aside."""
    result = subprocess.run(["ps", "-eo", "pgid=,stat=,comm="], capture_output=True, text=True)
    return [
        line
        for line in result.stdout.splitlines()
        if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")
    ]


def _gone_within(pgid: int, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _alive_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_run_killed_after_round_0_resumes_to_the_same_adapters(tmp_path, data_dir, capfd):
    """Killed with -9 after round 0 of 2 and resumed, the run ends with the adapters of the
    uninterrupted one, bit for bit: the in-process reference, which the Flower run equals
    (test_federation's test_the_flower_run_adds_nothing_to_the_algorithm). Round 0 is
    recorded once (a resume from round 0 used to write it twice)."""
    config = load_config(TINY, data_dir=str(data_dir), overrides=SMALL)
    killed = tmp_path / "killed"
    process = _run_until_round(data_dir, killed, SMALL, done=0)
    os.kill(process.pid, signal.SIGKILL)  # kill -9: the run itself cleans up nothing
    process.wait(timeout=30)
    latest = killed / "checkpoint" / "latest"
    assert latest.read_text().strip() == "0" and not (killed / "adapters").exists()
    time.sleep(5)  # Ray notices that its driver is gone; what outlives that is left over
    left = _alive_in_group(process.pid)

    capfd.readouterr()
    rows = simulate(config, killed, resume=True)
    # The next run stops what the killed one left behind, and says so.
    if left:
        assert f"stopped {len(left)} Ray processes that a killed earlier run left" in (
            capfd.readouterr().out
        ), left
    assert _alive_in_group(process.pid) == []
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["round"] for r in read_metrics(killed / "metrics.jsonl")] == [0, 1, 2]
    assert [r["round"] for r in load_checkpoint(killed / "checkpoint", config).rows] == [0, 1, 2]
    server = CoTuningServer.from_config(config)
    whole = list(reference_rounds(config, server))
    for row, result in zip(rows[1:], whole, strict=True):
        assert row["aggregate_sha256"] == adapter_digest(result.aggregate)
        assert row["distilled_sha256"] == adapter_digest(result.slm_adapter)
    for role, model in (("slm", server.slm), ("llm", server.llm)):
        resumed = load_file(killed / "adapters" / role / "adapter_model.safetensors")
        assert adapter_digest(resumed) == adapter_digest(get_adapter(model)), role


@pytest.mark.parametrize(
    ("signum", "to_group", "times"),
    [(signal.SIGINT, True, 3), (signal.SIGTERM, False, 1), (signal.SIGTERM, True, 1)],
)
def test_ctrl_c_and_sigterm_stop_the_run_cleanly(tmp_path, data_dir, signum, to_group, times):
    # Ctrl-C reaches the whole process group (Ray's processes too), perhaps several times;
    # a SIGTERM from a scheduler reaches the run's process, or its whole group (which, with
    # Ray's C++ failure handler on, aborted with exit 134 and a C++ stack).
    out = tmp_path / "run"
    process = _run_until_round(data_dir, out, [*SMALL, "rounds=6"], done=0)
    for _ in range(times):
        (os.killpg if to_group else os.kill)(process.pid, signum)
        time.sleep(0.3)
    code = process.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert code == 128 + signum, log
    assert f"interrupted by {signal.Signals(signum).name}" in log and "--resume" in log
    assert "Traceback" not in log
    # A log says what happened: no colour codes, no redrawn progress bars, no Flower
    # warning at every exit.
    for noise in ("\x1b[", "Loading weights", "Manually terminating"):
        assert noise not in log, noise
    assert _gone_within(process.pid, 15) == []  # Ray's daemons and client actors included
    config = load_config(TINY, data_dir=str(data_dir), overrides=[*SMALL, "rounds=6"])
    checkpoint = load_checkpoint(out / "checkpoint", config)
    assert len(checkpoint.rows) == checkpoint.server_round + 1


def test_sigterm_quiets_flower_before_rays_handler_exits(tmp_path):
    # The race CI once lost: Ray's handler exits, Flower shuts Ray down on the way out and
    # logs the client actors that die as crashes, before the run can say it is stopping.
    import logging

    import ray._private.utils as ray_utils

    from fedcollm.federation import processes

    levels = []
    previous = signal.getsignal(signal.SIGTERM)
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.ERROR)
    try:
        with processes.stopped_with_the_run(tmp_path):
            ray_utils.set_sigterm_handler(lambda signum, frame: levels.append(flwr.level))
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        flwr.setLevel(logging.ERROR)
    assert levels == [logging.CRITICAL]
    # Outside a run, Ray's handler is installed as it is.
    handler = lambda signum, frame: None  # noqa: E731
    try:
        ray_utils.set_sigterm_handler(handler)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_client_that_times_out_is_dropped_and_the_round_goes_on(tmp_path, data_dir, monkeypatch):
    """Flower's round_timeout without racing a clock: the server's clock passes the deadline
    only once the other two clients' replies are in, however long they took, and the slow
    client waits until the round is over."""
    config = load_config(
        TINY, data_dir=str(data_dir), overrides=[*SMALL, "rounds=1", "federation.round_timeout=45"]
    )
    round_over = tmp_path / "round-over"
    app = ClientApp()

    @app.train()
    def _train(msg, context):
        if int(context.node_config["partition-id"]) == 2:
            while not round_over.exists():
                time.sleep(0.05)
            raise RuntimeError("answered after the round was over")
        return train(config, msg, context)

    answered: list = []
    pull = InMemoryGrid.pull_messages

    def counting(self, message_ids):
        replies = list(pull(self, message_ids))
        answered.extend(replies)
        return replies

    class Clock:  # the clock of Flower's in-memory grid: past any deadline once two answered
        sleep = staticmethod(time.sleep)

        @staticmethod
        def time() -> float:
            return time.time() + (1e6 if len(answered) >= 2 else 0.0)

    finish = RoundBookkeeping.finish

    def finishing(self, *args, **kwargs):
        round_over.touch()
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(InMemoryGrid, "pull_messages", counting)
    monkeypatch.setattr(inmemory_grid, "time", Clock)
    monkeypatch.setattr(RoundBookkeeping, "finish", finishing)
    rows = simulate(config, tmp_path, client_app=app)
    assert sorted(c["partition"] for c in rows[1]["clients"]) == [0, 1]
    (dropped,) = rows[1]["dropped"]
    assert "no reply within round_timeout 45 s" in dropped["error"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_signal_whose_exception_python_ignores_is_delivered_again(tmp_path):
    """A signal that lands in an at-fork callback or a `__del__` (where Python prints and
    drops the handler's exception) still stops the run: it is delivered again."""

    class Collected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt here is only printed

    with pytest.raises(processes.RunInterrupted, match="interrupted by SIGINT"):
        with processes.stopped_with_the_run(tmp_path):
            Collected()  # dropped at once: its __del__ runs now
            for _ in range(600):  # the run goes on; within a minute it must be stopped
                time.sleep(0.1)
