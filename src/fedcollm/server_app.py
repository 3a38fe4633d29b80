"""Flower ServerApp: the FedCoLLM strategy over the core in `cotuning.py`.

`FedCoLLM.configure_train` is step 1 (broadcast theta), the ClientApp does step 2, and
`FedCoLLM.aggregate_train` hands the replies to `CoTuningServer.server_update` for steps 3-4
and returns the distilled theta, which Flower's round loop broadcasts next (step 5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcollm.config import Config
from fedcollm.cotuning import ClientUpdate, CoTuningServer, evaluation_questions
from fedcollm.metrics import MetricsLog, progress_line, summary_table, worth_reporting
from fedcollm.models import adapter_numel
from fedcollm.report import write_report
from fedcollm.tasks import Question
from fedcollm.wire import (
    adapter_digest,
    adapter_to_record,
    config_from_run_config,
    record_bytes,
    record_to_adapter,
)


def _partition(reply: Message) -> int:
    """The data partition a reply comes from (failed replies first; they carry none)."""
    return -1 if reply.has_error() else int(reply.content["metrics"]["partition"])


class FedCoLLM(FedAvg):
    """Every client trains every round; aggregation is replaced by aggregate-then-distill."""

    def __init__(self, server: CoTuningServer, eval_questions: list[Question], metrics: MetricsLog):
        k = server.config.num_clients
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k
        )
        self.server, self.eval_questions, self.metrics = server, eval_questions, metrics
        self.config: Config = server.config
        self.row: dict[str, Any] = {}
        self.round_started = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config, grid: Grid
    ) -> Iterable[Message]:
        """Step 1: broadcast theta, which after round 1 is the previous distilled adapter."""
        self.round_started = time.perf_counter()
        self.row = {"broadcast_sha256": adapter_digest(record_to_adapter(arrays))}
        config["evaluate-own"] = self.config.eval.clients and server_round == self.config.rounds
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Steps 3-4 on the clients' replies; returns the theta to broadcast next."""
        clients_seconds = time.perf_counter() - self.round_started
        updates, clients, dropped = [], [], []
        # Replies arrive in whatever order clients finish; summing in partition order keeps
        # the aggregate bit-for-bit reproducible.
        replies = sorted(replies, key=_partition)
        for reply in replies:
            if reply.has_error():
                dropped.append({"node": reply.metadata.src_node_id, "error": str(reply.error)})
                continue
            metrics = reply.content["metrics"]
            updates.append(
                ClientUpdate(
                    adapter=record_to_adapter(reply.content["arrays"]),
                    num_examples=int(metrics["num-examples"]),
                    train_loss=float(metrics["train_loss"]),
                    steps=int(metrics["steps"]),
                )
            )
            clients.append(
                {
                    "partition": int(metrics["partition"]),
                    "num_examples": int(metrics["num-examples"]),
                    "train_loss": float(metrics["train_loss"]),
                    "steps": int(metrics["steps"]),
                    "bytes_received": int(metrics["bytes_received"]),
                    "bytes_sent": record_bytes(reply.content["arrays"]),
                    "seconds": float(metrics["seconds"]),
                    "received_sha256": reply.content["receipt"]["received_sha256"],
                    **{k: float(metrics[k]) for k in ("own_acc", "own_acc_norm") if k in metrics},
                }
            )
        if not updates:
            raise RuntimeError(f"round {server_round}: no client returned an update: {dropped}")
        result = self.server.server_update(updates, server_round, on_step=self._distill_progress)
        self.row.update(
            clients=clients,
            dropped=dropped,
            client_train_loss=sum(u.train_loss for u in updates) / len(updates),
            aggregate_sha256=adapter_digest(result.aggregate),
            distilled_sha256=adapter_digest(result.slm_adapter),
            seconds={"clients": clients_seconds, **result.seconds},
            **result.losses,
        )
        next_theta = adapter_to_record(result.slm_adapter, self.config.federation.adapter_dtype)
        return next_theta, MetricRecord({"train_loss": self.row["client_train_loss"]})

    def _distill_progress(self, step: int, total: int, losses) -> None:
        if worth_reporting(step, total):
            latest = {k: v[-1] for k, v in vars(losses).items() if v}
            shown = " ".join(f"{k} {v:.3f}" for k, v in latest.items())
            print(f"  distillation step {step}/{total}: {shown}", flush=True)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation of the LLM and the global SLM; writes the round's metrics row."""
        start = time.perf_counter()
        # Without distillation (FedAvg) the LLM never changes: score it once.
        if server_round == 0 or self.config.distill.enabled:
            self.llm_accuracy = self.server.evaluate(self.eval_questions, ["llm"])["llm"]
        accuracy = {"llm": self.llm_accuracy, **self.server.evaluate(self.eval_questions, ["slm"])}
        row = {
            "round": server_round,
            "task": self.config.task,
            "eval_split": self.config.eval.split,
            "eval_questions": len(self.eval_questions),
            "clients": [],
            "client_train_loss": None,
            **self.row,
        }
        for role, acc in accuracy.items():
            row[f"{role}_acc"], row[f"{role}_acc_norm"] = acc.acc, acc.acc_norm
        seconds = row.setdefault("seconds", {})
        seconds["evaluation"] = time.perf_counter() - start
        seconds["round"] = time.perf_counter() - (self.round_started if server_round else start)
        row["adapter_params"] = adapter_numel(record_to_adapter(arrays))
        row["slm_params"] = sum(
            p.numel() for name, p in self.server.slm.named_parameters() if "lora_" not in name
        )
        self.metrics.write(row)
        print(progress_line(row, self.config.rounds), flush=True)
        self.row = {}
        return MetricRecord({"llm_acc": row["llm_acc"], "slm_acc": row["slm_acc"]})


def run_server(grid: Grid, config: Config, out_dir: Path) -> list[dict[str, Any]]:
    """The whole server side of one run; returns the metrics rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    print(f"loading the server LLM ({config.llm.name}) and SLM ({config.slm.name})", flush=True)
    server = CoTuningServer.from_config(config)
    strategy = FedCoLLM(server, evaluation_questions(config), MetricsLog(out_dir))
    strategy.start(
        grid=grid,
        initial_arrays=adapter_to_record(server.slm_adapter, config.federation.adapter_dtype),
        num_rounds=config.rounds,
        timeout=config.federation.round_timeout,
        evaluate_fn=strategy.evaluate,
    )
    server.save_adapters(out_dir)
    report = write_report(strategy.metrics.rows, config.to_dict(), out_dir)
    print("\n" + summary_table(strategy.metrics.rows), flush=True)
    print(f"\nreport: {report}\nmetrics: {strategy.metrics.path}", flush=True)
    print(f"adapters: {out_dir / 'adapters'}", flush=True)
    return strategy.metrics.rows


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the experiment is the TOML file the run config names."""
    run_config = context.run_config
    out_dir = Path(str(run_config.get("out-dir", "runs/flwr")))
    run_server(grid, config_from_run_config(run_config), out_dir)
