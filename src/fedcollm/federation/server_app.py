"""Flower ServerApp: the FedCoLLM strategy over the algorithm in `fedcollm.algorithm`:
`algorithm/round.py`'s `fedcollm_round`, carried over the network. Each step of
Algorithm 1 is one callback of the strategy (plain here, `secure_server.py`'s under
`federation.secure_aggregation`); the round's record is `rounds.py`'s:

| step             | plain `FedCoLLM`      | secure `SecureFedCoLLM`  | `RoundBookkeeping` |
| ---------------- | --------------------- | ------------------------ | ------------------ |
| 1 broadcast      | `configure_train`     | `configure_fit`          | `begin`            |
| 2 clients tune   | ClientApp `train`     | ClientApp `secure_train` |                    |
| 3 aggregate      | `aggregate_train`:    | SecAgg+, then            | `finish`           |
|                  | `_screen` each reply, | `aggregate_fit`:         |                    |
| 4 distil         | `server_update`       | `co_tune`                | `finish`           |
| 5 next broadcast | the distilled theta, which Flower sends next | the same | `evaluate`   |

`run_server` is the same for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.compute import ON_TIME
from fedcollm.algorithm.grouped_server import GroupedServer, server_for
from fedcollm.algorithm.ranks import client_rank
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import Config
from fedcollm.data import get_task
from fedcollm.federation.rounds import RoundBookkeeping
from fedcollm.federation.sampling import roll_call
from fedcollm.federation.screening import UpdateRejected, check_update
from fedcollm.federation.secure_server import run_secure_rounds
from fedcollm.federation.traffic import MeteredGrid
from fedcollm.federation.wire import (
    adapter_to_record,
    config_from_run_config,
    record_bytes,
    record_to_adapter,
)
from fedcollm.models import DTYPES, Adapter, adapter_digest
from fedcollm.preflight import check_run
from fedcollm.tracking.checkpoint import restore
from fedcollm.tracking.metrics import MetricsLog, headline_scores, summary_table
from fedcollm.tracking.report import write_report
from fedcollm.tracking.run_dir import RunStart, prepare_run


def _partition(reply: Message) -> int:
    """The data partition a reply says it comes from (-1 when it says nothing readable)."""
    try:
        return int(reply.content["metrics"]["partition"])
    except Exception:  # noqa: BLE001 - failed, empty or malformed replies carry none
        return -1


def _data_metrics(metrics, config: Config) -> dict[str, Any]:
    """What a client says of its training, all of it shaped by D_k; with
    `privacy.withhold_metrics` it says none of it (the row records that, not zeros)."""
    if config.privacy.withhold_metrics:
        return {"num_examples": 0, "train_loss": None, "steps": 0, "withheld": True}
    said = {
        "num_examples": int(metrics["num-examples"]),
        "train_loss": float(metrics["train_loss"]),
        "steps": int(metrics["steps"]),
        "seconds": float(metrics["seconds"]),
    }
    if "clock_seconds" in metrics:  # a client of an earlier version does not send it
        said["clock_seconds"] = float(metrics["clock_seconds"])
    return said


def _late(config: Config) -> str:
    return f"late: its budget needs more than client.deadline_s = {config.client.deadline_s:g} s"


def read_update(
    reply: Message, sent: Adapter, sent_digest: str, config: Config
) -> tuple[ClientUpdate, dict]:
    """A client's reply as a screened update plus its metrics row; UpdateRejected if bad,
    and if its receipt shows that it tuned another theta than the one `sent` (whose
    `adapter_digest` is `sent_digest`)."""
    content = reply.content
    arrays, metrics = content.array_records.get("arrays"), content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        raise UpdateRejected("empty message: it lacks the adapter arrays or the metrics")
    try:
        tensors = arrays.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - whatever the client sent, say what it was
        raise UpdateRejected(f"arrays are not readable as tensors ({err})") from None
    wire = DTYPES[config.federation.adapter_dtype]
    norm = check_update(tensors, sent, wire, config.federation.max_update_norm)
    own = own_keys(config)
    try:
        row = {
            "partition": int(metrics["partition"]),
            **_data_metrics(metrics, config),
            "bytes_received": int(metrics["bytes_received"]),
            "bytes_sent": record_bytes(arrays),
            "update_norm": norm,
            # A client's own scores: the task's metrics and their stderrs, nothing else.
            **{k: float(v) for k, v in metrics.items() if k in own},
        }
        receipt = content.config_records["receipt"]
        row["outcome"] = str(receipt.get("outcome", ON_TIME))  # earlier clients: on time
        row["received_sha256"] = str(receipt["received_sha256"])
        if "scored_sha256" in receipt:
            row["scored_sha256"] = str(receipt["scored_sha256"])
        if "own_predictions" in receipt:
            row["own_predictions"] = json.loads(str(receipt["own_predictions"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UpdateRejected(f"metrics incomplete or malformed ({err!r})") from None
    if not 0 <= row["partition"] < config.num_clients:
        raise UpdateRejected(
            f"partition {row['partition']} is not one of the {config.num_clients} partitions"
        )
    if row["num_examples"] < 1 and not config.privacy.withhold_metrics:
        raise UpdateRejected(f"num-examples {row['num_examples']}: a client trains on some")
    if row["received_sha256"] != sent_digest:
        raise UpdateRejected(
            f"its receipt says it tuned theta {row['received_sha256']}, but the server sent "
            f"{sent_digest}"
        )
    update = ClientUpdate(
        adapter={k: v.float() for k, v in tensors.items()},
        num_examples=row["num_examples"],
        train_loss=row["train_loss"],
        steps=row["steps"],
        seconds=row.get("clock_seconds", 0.0),
        outcome=row["outcome"],
        rank=client_rank(config, row["partition"]),  # the config's, not the client's word
        partition=row["partition"],
    )
    return update, row


class FedCoLLM(FedAvg):
    """Every client trains every round; aggregation is replaced by aggregate-then-distill."""

    def __init__(self, rounds: RoundBookkeeping):
        quorum = rounds.config.federation.min_clients
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=quorum,
            min_available_nodes=quorum,
        )
        self.rounds, self.server, self.config = rounds, rounds.server, rounds.config
        self.sent = {}
        self.sent_to: set[int] = set()
        # With clients of several SLMs (algorithm/groups.py): partition -> (theta_g, digest).
        self.grouped = isinstance(self.server, GroupedServer)
        self.parts: dict[int, tuple[Adapter, str]] = {}
        self.node_partitions: dict[int, int] = {}
        self.partition_nodes: dict[int, int] = {}

    @property
    def row(self) -> dict[str, Any]:
        return self.rounds.row

    @property
    def sent(self) -> Adapter:
        """theta as broadcast this round; its digest, which every receipt must show, is
        computed once here rather than once per reply."""
        return self._sent

    @sent.setter
    def sent(self, adapter: Adapter) -> None:
        self._sent, self.sent_digest = adapter, adapter_digest(adapter)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config, grid: Grid
    ) -> Iterable[Message]:
        """Step 1: broadcast theta, which after round 1 is the previous distilled adapter."""
        self.sent = record_to_adapter(arrays)
        server_round = self.rounds.begin(server_round, self.sent)
        config["evaluate-own"] = self.config.eval.clients and self.rounds.is_last(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.config.federation.clients_per_round or self.grouped:
            chosen = {self.partition_nodes.get(p) for p in self.rounds.sampled}
            messages = [m for m in messages if m.metadata.dst_node_id in chosen]
        self.sent_to = {m.metadata.dst_node_id for m in messages}
        if self.grouped:  # each node its own group's theta, nothing of the other groups'
            self.parts = {}
            for message in messages:
                partition = self.node_partitions[message.metadata.dst_node_id]
                theta = self.server.broadcast_to(partition, self.sent)
                self.parts[partition] = theta, adapter_digest(theta)
                wire = adapter_to_record(theta, self.config.federation.adapter_dtype)
                message.content = RecordDict({"arrays": wire, "config": config})
        return messages

    def _sent_for(self, node: int) -> tuple[Adapter, str]:
        """The theta this round sent to `node`, and its digest."""
        partition = self.node_partitions.get(node, -1)
        return self.parts.get(partition, (self.sent, self.sent_digest))

    def _screen(self, server_round: int, replies: Iterable[Message]):
        """Valid updates in partition order, and what was dropped or rejected, and why."""
        updates, clients, dropped, rejected = [], [], [], []
        # Replies arrive in whatever order clients finish; summing in partition order keeps
        # the aggregate bit-for-bit reproducible.
        replies = sorted(replies, key=_partition)
        timeout = f"no reply within round_timeout {self.config.federation.round_timeout:g} s"
        for node in sorted(self.sent_to - {r.metadata.src_node_id for r in replies}):
            partition = self.node_partitions.get(node)
            dropped.append({"node": node, "partition": partition, "error": timeout})
        for reply in replies:
            node = reply.metadata.src_node_id
            who = {"node": node, "partition": self.node_partitions.get(node, _partition(reply))}
            if reply.has_error():
                dropped.append({**who, "error": str(reply.error)})
                continue
            try:
                update, client = read_update(reply, *self._sent_for(node), self.config)
                partition = client["partition"]
                owner = self.partition_nodes.get(partition, node)
                if owner != node:
                    raise UpdateRejected(f"partition {partition} belongs to node {owner}")
                if any(c["partition"] == partition for c in clients):
                    raise UpdateRejected(f"partition {partition} already answered")
            except UpdateRejected as err:
                print(
                    f"round {server_round}: rejected the update of node {node} "
                    f"(partition {who['partition']}): {err}",
                    flush=True,
                )
                rejected.append({**who, "reason": str(err)})
                continue
            # A partition belongs to the node that first sent a valid update for it
            # (docs/SECURITY.md says what that leaves open).
            self.node_partitions[node] = client["partition"]
            self.partition_nodes.setdefault(client["partition"], node)
            if not update.contributes:  # past the round's deadline (client.late = "drop")
                client.pop("train_loss")  # it trained on nothing that counts
                dropped.append({"node": node, **client, "error": _late(self.config)})
                continue
            updates.append(update)
            clients.append({"node": node, **client})
        return updates, clients, dropped, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Steps 3-4 on the clients' valid replies; returns the theta to broadcast next."""
        server_round = self.rounds.true_round(server_round)
        updates, clients, dropped, rejected = self._screen(server_round, replies)
        theta = self.rounds.finish(
            server_round,
            self.rounds.with_traffic(clients),
            len(updates),
            lambda progress: self.server.server_update(updates, self.sent, server_round, progress),
            dropped=dropped,
            rejected=rejected,
        )
        if theta is None:
            return None, None
        next_theta = adapter_to_record(theta, self.config.federation.adapter_dtype)
        loss = self.row["client_train_loss"]  # None when the clients withhold it
        return next_theta, MetricRecord({} if loss is None else {"train_loss": loss})

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row = self.rounds.evaluate(server_round, record_to_adapter(arrays))
        return row and MetricRecord(headline_scores(row))


def run_rounds(grid: MeteredGrid, rounds: RoundBookkeeping, owners: dict[int, int]) -> None:
    """The remaining rounds with plain aggregation: the server screens every update.
    `owners` (partition -> node, from the roll call) binds partitions to nodes up front."""
    config, strategy = rounds.config, FedCoLLM(rounds)
    strategy.partition_nodes = dict(owners)
    strategy.node_partitions = {node: p for p, node in owners.items()}
    theta = rounds.server.slm_adapter
    strategy.start(
        grid=grid,
        initial_arrays=adapter_to_record(theta, config.federation.adapter_dtype),
        num_rounds=rounds.last_round - rounds.first_round,
        timeout=config.federation.round_timeout,
        evaluate_fn=strategy.evaluate,
    )


def privacy_budget_rounds(server: CoTuningServer | GroupedServer, config: Config) -> int:
    """The last round privacy.max_epsilon allows (config.rounds without a limit); says so
    when the budget stops the run early."""
    max_epsilon = config.privacy.max_epsilon
    if not max_epsilon:
        return config.rounds
    last = server.privacy.rounds_within(max_epsilon, config.rounds)
    if last < config.rounds:
        print(
            f"privacy budget: stopping after round {last} of {config.rounds}; round "
            f"{last + 1} would take epsilon from {server.privacy.epsilon(last):.3g} to "
            f"{server.privacy.epsilon(last + 1):.3g}, past privacy.max_epsilon = "
            f"{max_epsilon:g} (delta {config.privacy.target_delta:g}). Everything so far is "
            "saved; raise privacy.max_epsilon and --resume to go on",
            flush=True,
        )
    return last


def own_keys(config: Config) -> set[str]:
    """The metric keys a client may report about its own adapter (docs/MESSAGES.md)."""
    names = get_task(config.task).metric_names
    return {f"own_{m}" for m in names} | {f"own_{m}_stderr" for m in names}


def run_server(
    grid: Grid,
    context: Context,
    config: Config,
    out_dir: Path,
    resume: bool = False,
    start: RunStart | None = None,
) -> list[dict[str, Any]]:
    """The whole server side of one run, or of its rest after `resume`; returns the rows.

    Everything that can refuse the run (the output directory, the checkpoint, the config
    and the data against it) is checked before anything is written to `out_dir`, by
    `prepare_run` here unless the caller did (`start`)."""
    start = start or prepare_run(config, out_dir, resume)
    checkpoints, checkpoint = out_dir / "checkpoint", start.checkpoint
    print(f"loading the server LLM ({config.llm.name}) and SLM ({config.slm.name})", flush=True)
    server = server_for(config, progress=lambda m: print(m, flush=True))
    if checkpoint:
        restore(server, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    # Who holds what: D_a's and each client's size, and (by_field) each value's client.
    split_record = {"partition": config.data.partition, "field": config.data.partition_field}
    split_record.update(server.split.summary())
    (out_dir / "partition.json").write_text(json.dumps(split_record, indent=2))
    trackers = None
    if config.tracking:
        from fedcollm.tracking.trackers import Trackers

        trackers = Trackers(config.tracking, out_dir, str(out_dir), config.to_dict())
    metrics, resumed_after = MetricsLog(out_dir, trackers), None
    if checkpoint:
        metrics.write_all(checkpoint.rows)
        resumed_after = checkpoint.server_round
        print(f"resuming after round {resumed_after} of {config.rounds}", flush=True)
    # The roll call goes before the meter: its bytes belong to no round.
    # Sampling, and groups (whose theta a node gets), need each node's partition up front.
    bound = config.federation.clients_per_round or isinstance(server, GroupedServer)
    owners = roll_call(grid, config) if bound else {}
    grid = MeteredGrid(grid)
    rounds = RoundBookkeeping(
        server, start.eval_questions, metrics, checkpoints, resumed_after, grid
    )
    rounds.last_round = privacy_budget_rounds(server, config)
    if rounds.first_round < rounds.last_round:
        if config.federation.secure_aggregation:
            run_secure_rounds(grid, context, rounds, owners)
        else:
            run_rounds(grid, rounds, owners)
    metrics.close()
    server.save_adapters(out_dir)
    report = write_report(metrics.rows, config.to_dict(), out_dir)
    print("\n" + summary_table(metrics.rows), flush=True)
    print(f"\nreport: {report}\nmetrics: {metrics.path}", flush=True)
    print(f"adapters: {out_dir / 'adapters'}", flush=True)
    return metrics.rows


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the experiment is the TOML file the run config names."""
    run_config = context.run_config
    out_dir = Path(str(run_config.get("out-dir", "runs/flwr")))
    resume = bool(run_config.get("resume", False))
    config = check_run(config_from_run_config(run_config), simulated=False)
    run_server(grid, context, config, out_dir, resume)
