"""The README's other entry point, Flower's own `flwr run .` on the local simulation
federation, runs the app from pyproject.toml's [tool.flwr.app] end to end: an upgrade of
Flower that breaks it (or removes `run_simulation`, which `fedcollm run` uses) fails here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_flwr_run_on_the_local_simulation_federation(tmp_path, data_dir):
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        # Otherwise the local SuperLink installs the app's dependencies into a fresh
        # environment first: gigabytes of CUDA wheels for the torch pin.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    out = tmp_path / "out"
    run_config = f'out-dir="{out}" data-dir="{data_dir}" set="rounds=1"'
    command = ["flwr", "run", ".", "--federation-config", "num-supernodes=3",
               "--run-config", run_config, "--stream"]  # fmt: skip
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=900)  # fmt: skip
    finally:
        _stop_local_superlink(home)  # `flwr run` leaves it running in the background
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1]
    assert sorted(c["partition"] for c in rows[1]["clients"]) == [0, 1, 2]
    assert (out / "adapters" / "slm" / "adapter_model.safetensors").is_file()


def _stop_local_superlink(home: Path) -> None:
    ps = ["ps", "-ww", "-eo", "pid,args"]
    listing = subprocess.run(ps, capture_output=True, text=True).stdout
    for line in listing.splitlines()[1:]:
        pid, args = line.strip().split(" ", 1)
        if "flower-super" in args and (str(home) in args or "--parent-pid" in args):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
