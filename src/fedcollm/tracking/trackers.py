"""Per-round metrics to TensorBoard and to MLflow, each optional (`tracking = [...]`).

Every number of a metrics row is logged at step = round: the scores (`llm_acc`...), the
losses, epsilon, the seconds of each phase (`seconds/clients`...) and each client's own
numbers (`client_2/train_loss`...). TensorBoard's event files go to `<out>/tensorboard`;
MLflow's run to `<out>/mlflow.db` (SQLite: MLflow 3 keeps its plain-file store in
maintenance and refuses it by default) unless MLFLOW_TRACKING_URI names another store.
A resumed run logs into the same MLflow run and the same TensorBoard directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedcollm.config import ConfigError


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers, nested keys joined by '/', clients by partition."""
    out: dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int | float) and math.isfinite(value):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}" if prefix else key, inner)

    for key, value in row.items():
        if key == "clients":
            for client in value:
                name = f"client_{client.get('partition', client.get('node'))}"
                add(name, {k: v for k, v in client.items() if k not in ("partition", "node")})
        elif key != "round":
            add(key, value)
    return out


class TensorBoard:
    def __init__(self, out_dir: Path, _name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run killed later keeps what was logged

    def close(self) -> None:
        self.writer.close()


def mlflow_uri(out_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir.resolve()}/mlflow.db"


def mlflow_run(out_dir: Path) -> dict[str, str] | None:
    """The MLflow run a resumed run logs into (its id and store), kept beside the run."""
    marker = out_dir / "mlflow_run.json"
    if not marker.is_file():
        return None
    try:
        kept = json.loads(marker.read_text(encoding="utf-8"))
        if isinstance(kept, dict) and isinstance(kept.get("run_id"), str):
            return kept
    except (ValueError, OSError):
        pass
    raise ConfigError(
        f"tracking: {marker} is damaged (no MLflow run id in it); remove it to log into a "
        "new MLflow run, or choose another --out"
    )


def check_trackers(names: list[str], out_dir: Path) -> None:
    """What would make a tracker fail minutes into a run, said before anything starts: its
    place taken by a file, an MLflow store that does not answer, a resumed run whose MLflow
    store moved."""
    if "tensorboard" in names and (out_dir / "tensorboard").exists():
        if not (out_dir / "tensorboard").is_dir():
            raise ConfigError(
                f"tracking: {out_dir / 'tensorboard'} is a file where TensorBoard writes; "
                "remove it or choose another --out"
            )
    if "mlflow" not in names:
        return
    uri = mlflow_uri(out_dir)
    kept = mlflow_run(out_dir)
    if kept is not None:
        kept = kept.get("tracking_uri", uri)
        if kept != uri:
            raise ConfigError(
                f"tracking: this run logged to MLflow at {kept}, MLFLOW_TRACKING_URI now says "
                f"{uri}; set it back to resume into the same MLflow run"
            )
    if not os.environ.get("MLFLOW_TRACKING_URI") and (out_dir / "mlflow.db").is_dir():
        raise ConfigError(
            f"tracking: {out_dir / 'mlflow.db'} is a directory where MLflow's database goes; "
            "remove it or choose another --out"
        )
    if uri.startswith(("http://", "https://")):
        _check_answers(uri)


def _check_answers(uri: str) -> None:
    """One quick request to an MLflow server: MLflow itself retries for minutes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            pass
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"tracking: the MLflow server at {uri} does not answer ({reason}); start it, fix "
            'MLFLOW_TRACKING_URI, or drop "mlflow" from tracking'
        ) from None


class MLflow:
    def __init__(self, out_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(out_dir)
        self.client = MlflowClient(tracking_uri=uri)
        # The run id is kept beside the run, so that --resume logs into the same MLflow run.
        kept = mlflow_run(out_dir)
        if kept is not None:
            self.run_id = kept["run_id"]
            return
        experiment = self.client.get_experiment_by_name("fedcollm")
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment("fedcollm")
        )
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        marker = out_dir / "mlflow_run.json"
        marker.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}))

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = 0  # MLflow's timestamp; the step (round) is what orders them
        metrics = [Metric(_mlflow_key(k), v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = scalars_and_text(config)
        params = [Param(_mlflow_key(k), str(v)[:500]) for k, v in flat.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def scalars_and_text(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as flat `section.key` -> value, for MLflow's parameters."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars_and_text(value, name + "."))
        else:
            flat[name] = value
    return flat


class Trackers:
    """The trackers a config asks for; `log(row)` after every metrics row."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, config: dict[str, Any]):
        kinds = {"tensorboard": TensorBoard, "mlflow": MLflow}
        self.active = [kinds[name](out_dir, run_name) for name in names]
        for tracker in self.active:
            # Parameters once per MLflow run: a resumed run has them already.
            if isinstance(tracker, MLflow) and not _has_params(tracker):
                tracker.log_config(config)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        for tracker in self.active:
            tracker.log(int(row["round"]), values)

    def close(self) -> None:
        for tracker in self.active:
            tracker.close()


def _has_params(tracker: MLflow) -> bool:
    return bool(tracker.client.get_run(tracker.run_id).data.params)
