"""The server's bookkeeping of every round, shared by the plain and the secure strategy:
true round numbers, the quorum, co-tuning what arrived, the metrics row, the central
evaluation and the checkpoint. A strategy only turns Flower's messages into client updates
(or, under secure aggregation, into their aggregate) and the distilled theta back into one.

Rounds after a resume keep their true numbers: Flower counts from 1 again, so the strategies
pass Flower's count through `true_round`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcollm.algorithm.round import sampled_partitions
from fedcollm.algorithm.server import CoTuningServer, ServerRound
from fedcollm.data import Question, get_task
from fedcollm.data.split import questions_digest
from fedcollm.federation.screening import UpdateRejected
from fedcollm.federation.wire import WireError
from fedcollm.models import Adapter, adapter_digest
from fedcollm.tracking.checkpoint import save_checkpoint
from fedcollm.tracking.metrics import (
    MetricsLog,
    progress_line,
    worth_reporting,
    write_predictions,
)


class RoundBookkeeping:
    """The server's record of a run's rounds around Algorithm 1's steps: `begin` (step 1:
    the round's clients and its privacy cost), `finish` (steps 3-4 on what arrived, or a
    skipped round), `evaluate` (`score`, then `record`: predictions, checkpoint, row)."""

    def __init__(
        self,
        server: CoTuningServer,
        eval_questions: list[Question],
        metrics: MetricsLog,
        checkpoints: Path,
        resumed_after: int | None = None,
        traffic=None,
    ):
        self.server, self.config = server, server.config
        self.eval_questions, self.metrics = eval_questions, metrics
        self.eval_fingerprint = questions_digest(eval_questions)  # checked on --resume
        self.checkpoints = checkpoints
        # The checkpointed round a resumed run goes on from (None: a fresh run). Round 0 is a
        # round like any other: `if resumed_after` would score and record it twice.
        self.resumed_after = resumed_after
        self.first_round = resumed_after or 0
        self.traffic = traffic  # counts message bytes per node: .take() -> (to, from)
        # The last round to run: config.rounds, or fewer when privacy.max_epsilon stops it.
        self.last_round = server.config.rounds
        self.sampled: list[int] = []  # this round's partitions
        self.row: dict[str, Any] = {}
        # Per question, what each client's own adapter answered (final round), by partition.
        self.client_predictions: dict[str, Any] = {}
        self.started = self.created = time.perf_counter()

    def true_round(self, flower_round: int) -> int:
        return flower_round + self.first_round

    def is_last(self, server_round: int) -> bool:
        """The one place that says whether a round is the run's last: `config.rounds`, or the
        last one the privacy budget allows."""
        return server_round == self.last_round

    def begin(self, flower_round: int, broadcast: Adapter) -> int:
        """Step 1 is under way with theta as broadcast to the partitions `self.sampled`
        (which the round's DP cost counts); returns the true round number."""
        self.started = time.perf_counter()
        server_round = self.true_round(flower_round)
        self.sampled = sampled_partitions(self.config, server_round)
        self.row = {"broadcast_sha256": adapter_digest(broadcast)}
        if self.config.federation.clients_per_round:
            self.row["sampled_partitions"] = self.sampled
        self.server.privacy.spend_round(self.sampled)
        return server_round

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

    def finish(
        self,
        server_round: int,
        clients: list[dict[str, Any]],
        contributors: int,
        co_tune: Callable[[Callable], ServerRound],
        **row: Any,
    ) -> Adapter | None:
        """Steps 3-4 once the replies are read: `co_tune(progress)` aggregates what the
        `contributors` sent and distils. Returns the theta to broadcast next, or None when
        the round is skipped (too few contributors, or an unusable aggregate)."""
        clients_seconds = time.perf_counter() - self.started
        for client in clients:  # the metrics row keeps scores; predictions go to their file
            if "own_predictions" in client:
                self.client_predictions[str(client["partition"])] = client.pop("own_predictions")
        self.row.update(clients=clients, **row)
        # The round's length on its clock (client.clock): its slowest client, or the
        # deadline that closed it.
        timed = [
            c["clock_seconds"] for c in [*clients, *row.get("dropped", [])] if "clock_seconds" in c
        ]
        if timed:
            self.row["clock_seconds"] = max(timed)
        quorum = self.config.federation.min_clients
        if contributors < quorum:
            self.skip(
                f"{contributors} valid updates, fewer than federation.min_clients = {quorum}",
                server_round,
            )
            return None
        try:
            result = co_tune(self._distill_progress)
        except (UpdateRejected, WireError) as err:
            self.skip(f"the aggregated adapter is unusable: {err}", server_round)
            return None
        losses = [c["train_loss"] for c in clients if c.get("train_loss") is not None]
        self.row.update(
            client_train_loss=sum(losses) / len(losses) if losses else None,
            aggregate_sha256=adapter_digest(result.aggregate),
            distilled_sha256=adapter_digest(result.slm_adapter),
            seconds={"clients": clients_seconds, **result.seconds},
            **result.losses,
            **result.measured,
        )
        return result.slm_adapter

    def skip(self, reason: str, server_round: int) -> None:
        self.row["skipped"] = reason
        self.row.setdefault("seconds", {})["clients"] = time.perf_counter() - self.started
        print(f"round {server_round}: skipped, theta unchanged: {reason}", flush=True)

    def _distill_progress(self, step: int, total: int, losses) -> None:
        if worth_reporting(step, total):
            latest = {k: v[-1] for k, v in vars(losses).items() if v}
            shown = " ".join(f"{k} {v:.3f}" for k, v in latest.items())
            print(f"  distillation step {step}/{total}: {shown}", flush=True)

    def evaluate(self, flower_round: int, slm_adapter: Adapter) -> dict[str, Any] | None:
        """The round's end: central evaluation, then its record. None for the round a
        resumed run starts after."""
        server_round = self.true_round(flower_round)
        if server_round == self.resumed_after:
            return None  # evaluated before the interruption
        row, predictions = self.score(server_round, slm_adapter)
        self.record(server_round, row, predictions)
        return row

    def score(self, server_round: int, slm_adapter: Adapter) -> tuple[dict[str, Any], dict]:
        """The round's metrics row: what the round measured, the LLM's and the global SLM's
        scores when due, and per question what each scored model answered."""
        start = time.perf_counter()
        row = {
            "round": server_round,
            "task": get_task(self.config.task).name,  # a task file's name, not its path
            "eval_split": self.config.eval.split,
            "eval_questions": len(self.eval_questions),
            # The task's headline metric and the one beside it, as the tables show them.
            "metrics": list(get_task(self.config.task).metric_names[:2]),
            "clients": [],
            "client_train_loss": None,
            **self.row,
        }
        # Without distillation (FedAvg) the LLM never changes: score it once.
        roles = ["llm", "slm"] if server_round == 0 or self.config.distill.enabled else ["slm"]
        if not self.config.eval.due(server_round, self.is_last(server_round)):
            roles = []  # the row keeps the round's training and traffic, no scores
        predictions: dict[str, Any] = {}
        for role, scores in self.server.evaluate(self.eval_questions, roles).items():
            row.update({f"{role}_{k}": v for k, v in scores.summary().items() if k != "n"})
            predictions[role] = scores.predictions()
        if roles:  # who knows D_a's answers better, beside who scores higher
            row.update(self.server.aux_losses())
        if self.client_predictions:
            predictions["clients"], self.client_predictions = self.client_predictions, {}
        if "llm" not in roles and "slm" in roles:
            row.update({k: v for k, v in self.metrics.rows[-1].items() if k.startswith("llm_")})
        if self.config.privacy.enabled:
            row.update(self.server.privacy.spent())
        seconds = row.setdefault("seconds", {})
        seconds["evaluation"] = time.perf_counter() - start
        seconds["round"] = time.perf_counter() - (self.started if server_round else start)
        # Wall clock of this process at the row: consecutive rows give the whole time between
        # rounds, Flower's own work and the previous checkpoint included.
        seconds["since_start"] = time.perf_counter() - self.created
        row.update(self.server.sizes(slm_adapter))
        return row, predictions

    def record(self, server_round: int, row: dict[str, Any], predictions: dict) -> None:
        """The predictions, the checkpoint, then the metrics row and the progress line: a
        kill between the checkpoint and the row leaves a round that --resume repeats,
        never a recorded round without its state."""
        if predictions:
            write_predictions(self.metrics.path.parent, server_round, predictions)
        rows = [*self.metrics.rows, row]
        save_checkpoint(self.checkpoints, server_round, self.server, rows, self.eval_fingerprint)
        self.metrics.write(row)
        print(progress_line(row, self.config.rounds), flush=True)
        self.row = {}
