"""Failures in Flower's simulation engine: failing and hostile clients, a killed server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedcollm.config import load_config
from fedcollm.federation.client_app import train
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_digest
from fedcollm.tracking.metrics import read_metrics

pytestmark = pytest.mark.slow
TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
SMALL = ["rounds=2", "eval.limit=8"]


def hostile_client_app(config) -> ClientApp:
    """Partition 1 crashes every round; partition 2 sends NaN; partition 0 behaves."""
    app = ClientApp()

    @app.train()
    def _train(msg, context):
        partition = int(context.node_config["partition-id"])
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
    rows = simulate(config, tmp_path, client_app=hostile_client_app(config))
    for row in rows[1:]:
        assert [c["partition"] for c in row["clients"]] == [0]
        assert len(row["dropped"]) == 1 and "disk full" in row["dropped"][0]["error"]
        assert [r["partition"] for r in row["rejected"]] == [2]
        assert "NaN or Inf" in row["rejected"][0]["reason"]
        assert "skipped" not in row and row["distilled_sha256"] != row["broadcast_sha256"]
    assert (tmp_path / "adapters" / "slm" / "adapter_model.safetensors").is_file()


def test_too_few_valid_clients_skip_the_round_and_keep_theta(tmp_path, data_dir):
    config = load_config(
        TINY, data_dir=str(data_dir), overrides=[*SMALL, "rounds=1", "federation.min_clients=2"]
    )
    rows = simulate(config, tmp_path, client_app=hostile_client_app(config))
    assert "fewer than federation.min_clients = 2" in rows[1]["skipped"]
    # theta unchanged: the saved adapter is the one the skipped round broadcast.
    saved = load_file(tmp_path / "adapters" / "slm" / "adapter_model.safetensors")
    assert adapter_digest(saved) == rows[1]["broadcast_sha256"]
    assert "distilled_sha256" not in rows[1]


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Ray starts its own daemons and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    for _ in range(2):  # a second pass catches workers started during the first
        for pid in _descendants(process.pid) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait(timeout=30)


def test_a_run_killed_after_round_1_resumes_to_the_same_adapters(tmp_path, data_dir):
    overrides = [*SMALL, "rounds=3"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    simulate(config, tmp_path / "whole")

    killed = tmp_path / "killed"
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
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
            str(killed),
            *sets,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    latest = killed / "checkpoint" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text().strip() == "1"):
            assert process.poll() is None, "the run ended before its round-1 checkpoint"
            assert time.monotonic() < deadline, "no round-1 checkpoint within 5 minutes"
            time.sleep(0.05)
    finally:
        _kill_tree(process)
    assert latest.read_text().strip() == "1" and not (killed / "adapters").exists()

    rows = simulate(config, killed, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for role in ("slm", "llm"):
        whole = load_file(tmp_path / "whole" / "adapters" / role / "adapter_model.safetensors")
        resumed = load_file(killed / "adapters" / role / "adapter_model.safetensors")
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), role
    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    for a, b in zip(expected, rows, strict=True):
        assert a["slm_acc"] == b["slm_acc"] and a.get("distilled_sha256") == b.get(
            "distilled_sha256"
        )


def test_a_client_that_times_out_is_dropped_and_the_round_goes_on(tmp_path, data_dir):
    config = load_config(
        TINY, data_dir=str(data_dir), overrides=[*SMALL, "rounds=1", "federation.round_timeout=45"]
    )
    app = ClientApp()

    @app.train()
    def _train(msg, context):
        if int(context.node_config["partition-id"]) == 2:
            time.sleep(100)  # far beyond round_timeout
        return train(config, msg, context)

    start = time.monotonic()
    rows = simulate(config, tmp_path, client_app=app)
    assert sorted(c["partition"] for c in rows[1]["clients"]) == [0, 1]
    (dropped,) = rows[1]["dropped"]
    assert "no reply within round_timeout 45 s" in dropped["error"]
    assert rows[1]["seconds"]["clients"] < 90, "the server waited for the slow client"
    assert time.monotonic() - start < 400
