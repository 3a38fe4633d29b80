"""Flower's deployment engine on 127.0.0.1: a SuperLink with TLS and SuperNode
authentication, two SuperNodes, a round; refused nodes; every process stopped."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def deploy(tmp_path, data_dir, **env: str) -> str:
    """deploy/local.sh with `env` added; its log, once it has succeeded."""
    env = {**os.environ, "WORK": str(tmp_path), "DATA": str(data_dir), **env}
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "local.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    return log


def test_two_supernodes_over_tls_and_refusals(tmp_path, data_dir):
    """A round between two authenticated SuperNodes over TLS; then an unregistered node and
    one trusting the wrong CA are refused. (SecAgg+ runs the same way, `SET=...`; its masks
    between processes are the simulation's tests.)"""
    log = deploy(tmp_path, data_dir, NEGATIVE="1", SET="rounds=1")

    # The server side reads the data directory the script was given, as the nodes do.
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["data_dir"] == str(data_dir)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows[1:]:
        assert "skipped" not in row
        assert sorted(c["partition"] for c in row["clients"]) == [0, 1]
        assert row["dropped"] == [] and row["rejected"] == []
        assert row["distilled_sha256"] != row["broadcast_sha256"]
    assert (tmp_path / "out" / "adapters" / "slm" / "adapter_model.safetensors").is_file()

    assert "unregistered-key: refused (exit 1): [code: 2004] Failed to activate SuperNode" in log
    assert "wrong-ca: refused (exit 1): [SSL: CERTIFICATE_VERIFY_FAILED]" in log
    superlink = (tmp_path / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink

    started = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(started) >= 3  # the SuperLink, two SuperNodes and their children
    alive = [p for p in started if _running(p)]
    assert alive == [], f"processes left running: {alive}"


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
