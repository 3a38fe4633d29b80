"""One FedCoLLM run in Flower's simulation engine: K virtual clients on this machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedcollm.config import Config
from fedcollm.console import plain_when_logged
from fedcollm.federation import processes


def simulate(
    config: Config,
    out_dir: Path,
    verbose: bool = False,
    resume: bool = False,
    client_app: Any = None,
    start: Any = None,
) -> list[dict[str, Any]]:
    """Run the ServerApp and K ClientApps (the given `client_app` in tests); returns the
    metrics rows and re-raises server errors. `resume` continues from out_dir's checkpoint;
    `start`: what `tracking.run_dir.prepare_run` found, if the caller ran it already."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every client's progress line, not a sample
    # Ray renices its workers to 15: on a machine with other work the clients then starve
    # (minutes per step). They run at the priority of the command that started them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray's C++ failure handler takes SIGTERM too: a SIGTERM while Ray starts (or to the
    # whole process group while a client trains) printed a C++ stack and aborted (exit 134)
    # instead of the run's "interrupted by SIGTERM ... --resume".
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedcollm.federation.client_app import QUIET_WORKERS, make_client_app
    from fedcollm.federation.server_app import run_server

    if not verbose:
        # Flower logs every round at INFO and warns that run_simulation is "deprecated" in
        # favour of `flwr run`, which `fedcollm run` wraps on purpose; errors still show.
        # Its workers (which inherit this environment) warn "Manually terminating" at exit.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ[QUIET_WORKERS] = "1"
    plain_when_logged()  # Ray's workers inherit it
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        # Flower only logs what escapes a ServerApp; keep it to hand it to the caller.
        try:
            outcome["rows"] = run_server(grid, context, config, out_dir, resume, start)
        except Exception as err:  # noqa: BLE001
            outcome["error"] = err

    with processes.stopped_with_the_run(out_dir):
        run_simulation(
            server_app=server_app,
            client_app=client_app or make_client_app(config),
            num_supernodes=config.num_clients,
            backend_config=backend_config(config),
            verbose_logging=verbose,
        )
    if "error" in outcome:
        raise outcome["error"]
    if "rows" not in outcome:
        raise RuntimeError("the simulation ended before the server finished; rerun with -v")
    return outcome["rows"]


def backend_config(config: Config, gpus: float | None = None) -> dict:
    """Ray's resources: each client actor asks for `client_cpus` and `client_gpus` (a share
    of a GPU is bookkeeping: 0.25 lets Ray place four actors on one GPU, whatever memory
    they need; `fedcollm run` checks that against the memory plan). `gpus` declares that
    many GPUs to Ray instead of its own detection (tests)."""
    init_args = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    if gpus is not None:
        init_args["num_gpus"] = gpus
    return {
        "client_resources": {
            "num_cpus": config.federation.client_cpus,
            "num_gpus": config.federation.client_gpus,
        },
        "init_args": init_args,
    }
