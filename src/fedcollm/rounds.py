"""What every round leaves on the server, whichever Flower strategy ran it: the metrics row,
the central evaluation of the LLM and the global SLM, and the checkpoint.

Rounds after a resume keep their true numbers: Flower counts from 1 again, so the strategies
pass Flower's count through `true_round`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedcollm.checkpoint import save_checkpoint
from fedcollm.cotuning import CoTuningServer, ServerRound
from fedcollm.metrics import MetricsLog, progress_line, worth_reporting
from fedcollm.models import Adapter, adapter_digest, adapter_numel
from fedcollm.tasks import Question


class RoundLog:
    def __init__(
        self,
        server: CoTuningServer,
        eval_questions: list[Question],
        metrics: MetricsLog,
        checkpoints: Path,
        first_round: int = 0,
        traffic=None,
    ):
        self.server, self.config = server, server.config
        self.eval_questions, self.metrics = eval_questions, metrics
        self.checkpoints, self.first_round = checkpoints, first_round
        self.traffic = traffic  # counts message bytes per node: .take() -> (to, from)
        self.row: dict[str, Any] = {}
        self.started = self.created = time.perf_counter()

    def true_round(self, flower_round: int) -> int:
        return flower_round + self.first_round

    def begin(self, broadcast: Adapter) -> None:
        """Step 1 is under way: theta as broadcast."""
        self.started = time.perf_counter()
        self.row = {"broadcast_sha256": adapter_digest(broadcast)}

    def clients_seconds(self) -> float:
        return time.perf_counter() - self.started

    def with_traffic(self, clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each client's row with the bytes of every message to and from its node this round
        (serialised as Flower sends them: all stages, headers and metadata included)."""
        if self.traffic is None:
            return clients
        to_node, from_node = self.traffic.take()
        return [
            {
                **c,
                "wire_bytes_received": to_node[c["node"]],
                "wire_bytes_sent": from_node[c["node"]],
            }
            for c in clients
        ]

    def skip(self, reason: str, server_round: int) -> None:
        self.row["skipped"] = reason
        self.row.setdefault("seconds", {})["clients"] = self.clients_seconds()
        print(f"round {server_round}: skipped, theta unchanged: {reason}", flush=True)

    def co_tuned(self, result: ServerRound, clients_seconds: float, train_losses: list) -> None:
        """Steps 3-4 are done: what they produced goes into the round's row."""
        losses = [x for x in train_losses if x is not None]
        self.row.update(
            client_train_loss=sum(losses) / len(losses) if losses else None,
            aggregate_sha256=adapter_digest(result.aggregate),
            distilled_sha256=adapter_digest(result.slm_adapter),
            seconds={"clients": clients_seconds, **result.seconds},
            **result.losses,
        )

    def distill_progress(self, step: int, total: int, losses) -> None:
        if worth_reporting(step, total):
            latest = {k: v[-1] for k, v in vars(losses).items() if v}
            shown = " ".join(f"{k} {v:.3f}" for k, v in latest.items())
            print(f"  distillation step {step}/{total}: {shown}", flush=True)

    def evaluate(self, flower_round: int, slm_adapter: Adapter) -> dict[str, Any] | None:
        """Central evaluation of the LLM and the global SLM; writes the round's metrics row
        and its checkpoint. None for the round a resumed run starts after."""
        server_round = self.true_round(flower_round)
        if self.first_round and server_round == self.first_round:
            return None  # evaluated before the interruption
        start = time.perf_counter()
        row = {
            "round": server_round,
            "task": self.config.task,
            "eval_split": self.config.eval.split,
            "eval_questions": len(self.eval_questions),
            "clients": [],
            "client_train_loss": None,
            **self.row,
        }
        # Without distillation (FedAvg) the LLM never changes: score it once.
        roles = ["llm", "slm"] if server_round == 0 or self.config.distill.enabled else ["slm"]
        for role, acc in self.server.evaluate(self.eval_questions, roles).items():
            row[f"{role}_acc"], row[f"{role}_acc_norm"] = acc.acc, acc.acc_norm
        if "llm_acc" not in row:
            row["llm_acc"] = self.metrics.rows[-1]["llm_acc"]
            row["llm_acc_norm"] = self.metrics.rows[-1]["llm_acc_norm"]
        seconds = row.setdefault("seconds", {})
        seconds["evaluation"] = time.perf_counter() - start
        seconds["round"] = time.perf_counter() - (self.started if server_round else start)
        # Wall clock of this process at the row: consecutive rows give the whole time between
        # rounds, Flower's own work and the previous checkpoint included.
        seconds["since_start"] = time.perf_counter() - self.created
        row["adapter_params"] = adapter_numel(slm_adapter)
        row["slm_params"] = sum(
            p.numel() for name, p in self.server.slm.named_parameters() if "lora_" not in name
        )
        self.metrics.write(row)
        save_checkpoint(self.checkpoints, server_round, self.server, self.metrics.rows)
        print(progress_line(row, self.config.rounds), flush=True)
        self.row = {}
        return row
