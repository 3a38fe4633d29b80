"""The server screens every client update before aggregation and keeps going without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import load_config
from fedcollm.data import load_questions
from fedcollm.federation.rounds import RoundBookkeeping
from fedcollm.federation.screening import UpdateRejected, check_update
from fedcollm.federation.server_app import FedCoLLM
from fedcollm.federation.wire import adapter_to_record
from fedcollm.models import adapter_digest
from fedcollm.tracking.checkpoint import latest_round, load_checkpoint
from fedcollm.tracking.metrics import MetricsLog

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
SENT = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.ones(3, 2)}


def tuned(delta: float = 0.01) -> dict[str, torch.Tensor]:
    return {k: v + delta for k, v in SENT.items()}


def test_a_well_formed_update_passes_and_reports_its_distance_from_theta():
    norm = check_update(tuned(0.5), SENT, torch.float32, max_norm=10.0)
    assert norm == pytest.approx(0.5 * 12**0.5)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({}, "empty update"),
        (None, "empty update"),
        ({"a.lora_A": torch.zeros(2, 3)}, "missing adapter keys: a.lora_B"),
        ({**tuned(), "b.lora_A": torch.zeros(1)}, "unexpected adapter keys: b.lora_A"),
        ({**tuned(), "a.lora_A": torch.zeros(3, 2)}, r"a.lora_A: shape \(3, 2\), expected"),
        ({**tuned(), "a.lora_B": torch.ones(3, 2).double()}, "a.lora_B: dtype torch.float64"),
        ({**tuned(), "a.lora_B": torch.ones(3, 2).half()}, "a.lora_B: dtype torch.float16"),
        ({**tuned(), "a.lora_A": torch.full((2, 3), float("nan"))}, "NaN or Inf"),
        ({**tuned(), "a.lora_B": torch.full((3, 2), float("inf"))}, "NaN or Inf"),
        ({**tuned(), "a.lora_A": torch.full((2, 3), 1e30)}, "exceeds federation.max_update"),
        ({**tuned(), "a.lora_A": [0.0] * 6}, "not a tensor"),
    ],
)
def test_each_kind_of_bad_update_is_rejected_with_its_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        check_update(update, SENT, torch.float32, max_norm=1000.0)


def test_a_norm_bound_of_zero_accepts_any_finite_update():
    huge = {**tuned(), "a.lora_A": torch.full((2, 3), 1e30)}
    assert check_update(huge, SENT, torch.float32, max_norm=0.0) > 1e30


# The strategy on its own, fed with hand-made replies: no Flower runtime needed.


@pytest.fixture(scope="module")
def server():
    config = load_config(TINY, overrides=['task="vell_fruits"', "data.train_limit=0"])
    return CoTuningServer.from_config(config)


@pytest.fixture
def strategy(server, tmp_path, monkeypatch):
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    strategy = FedCoLLM(RoundBookkeeping(server, [], MetricsLog(tmp_path), tmp_path / "checkpoint"))
    strategy.sent = server.slm_adapter
    strategy.sent_to = {10, 11, 12, 13}
    return strategy


def reply(server, node: int, partition: int, adapter=None, metrics=None, receipt=None) -> Message:
    """A client's reply as the ClientApp builds it; `adapter=False` leaves the arrays out."""
    receipt = receipt or adapter_digest(server.slm_adapter)  # it tuned the theta sent
    if adapter is None:
        adapter = {k: v + 0.01 for k, v in server.slm_adapter.items()}
    metrics = metrics or {
        "partition": partition,
        "num-examples": 5,
        "train_loss": 1.0,
        "steps": 2,
        "bytes_received": 10,
        "seconds": 0.1,
    }
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "receipt": ConfigRecord({"received_sha256": receipt})}
    )
    if adapter is not False:
        content["arrays"] = adapter_to_record(adapter)
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


def test_bad_updates_are_left_out_and_named_and_the_round_goes_on(server, strategy, capsys):
    broken = {k: v.clone() for k, v in server.slm_adapter.items()}
    next(iter(broken.values()))[0, 0] = float("nan")
    instruction = Message(content=RecordDict(), dst_node_id=13, message_type="train")
    replies = [
        reply(server, 10, 0),
        reply(server, 11, 1, adapter=broken),
        reply(server, 12, 2, adapter=False),
        Message(Error(code=0, reason="client crashed"), reply_to=instruction),
    ]
    theta, _ = strategy.aggregate_train(1, replies)
    row = strategy.row
    assert theta is not None and [c["partition"] for c in row["clients"]] == [0]
    assert row["clients"][0]["update_norm"] > 0
    rejected = {r["node"]: r["reason"] for r in row["rejected"]}
    assert "NaN or Inf" in rejected[11] and "empty message" in rejected[12]
    assert row["dropped"] == [{"node": 13, "partition": -1, "error": str(replies[3].error)}]
    log = capsys.readouterr().out
    assert "rejected the update of node 11 (partition 1)" in log and "NaN" in log


def test_clients_that_never_answer_are_recorded_as_dropped(server, strategy):
    strategy.node_partitions = {12: 2}
    strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 1)])
    dropped = {d["node"]: d for d in strategy.row["dropped"]}
    assert set(dropped) == {12, 13} and dropped[12]["partition"] == 2
    assert "no reply within round_timeout" in dropped[13]["error"]


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"partition": 0}, "metrics incomplete"),
        (
            {
                "partition": 7,
                "num-examples": 5,
                "train_loss": 1.0,
                "steps": 2,
                "bytes_received": 1,
                "seconds": 0.1,
            },
            "not one of the 3 partitions",
        ),
        (
            {
                "partition": 0,
                "num-examples": 0,
                "train_loss": 1.0,
                "steps": 2,
                "bytes_received": 1,
                "seconds": 0.1,
            },
            "num-examples 0",
        ),
    ],
)
def test_replies_with_bad_metrics_are_rejected(server, strategy, metrics, reason):
    strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 0, metrics=metrics)])
    assert reason in strategy.row["rejected"][0]["reason"]


def test_a_partition_answering_twice_counts_once(server, strategy):
    strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 0)])
    assert len(strategy.row["clients"]) == 1
    assert "partition 0 belongs to node 10" in strategy.row["rejected"][0]["reason"]
    strategy.sent = server.slm_adapter
    strategy.aggregate_train(2, [reply(server, 10, 0), reply(server, 10, 0)])
    assert len(strategy.row["clients"]) == 1
    assert "already answered" in strategy.row["rejected"][0]["reason"]


def test_a_round_with_fewer_valid_updates_than_min_clients_is_skipped(server, strategy):
    strategy.config.federation.min_clients = 2
    try:
        theta, _ = strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 1, {})])
    finally:
        strategy.config.federation.min_clients = 1
    assert theta is None  # Flower then broadcasts the previous theta again
    assert "fewer than federation.min_clients = 2" in strategy.row["skipped"]


def test_an_update_tuned_from_another_theta_is_rejected(server, strategy):
    strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 1, receipt="0" * 16)])
    assert [c["partition"] for c in strategy.row["clients"]] == [0]
    (rejected,) = strategy.row["rejected"]
    assert rejected["node"] == 11 and "tuned theta 0000000000000000" in rejected["reason"]


def test_a_node_cannot_take_over_another_nodes_partition(server, strategy):
    strategy.aggregate_train(1, [reply(server, 10, 0), reply(server, 11, 1)])
    # Next round node 12 claims partition 0 and its reply sorts first: node 10 keeps it.
    strategy.sent = server.slm_adapter  # the distilled theta, as configure_train would send
    strategy.aggregate_train(2, [reply(server, 12, 0), reply(server, 10, 0)])
    assert [(c["node"], c["partition"]) for c in strategy.row["clients"]] == [(10, 0)]
    (rejected,) = strategy.row["rejected"]
    assert rejected["node"] == 12 and "partition 0 belongs to node 10" in rejected["reason"]


def test_a_rounds_checkpoint_is_written_before_its_metrics_row(server, tmp_path, monkeypatch):
    # A kill between the two then leaves a round that --resume simply repeats.
    questions = load_questions("vell_fruits", "validation", None)[:4]
    rounds = RoundBookkeeping(server, questions, MetricsLog(tmp_path), tmp_path / "checkpoint")
    checkpointed_first = []
    write = MetricsLog.write

    def checking(self, row):
        checkpointed_first.append(latest_round(tmp_path / "checkpoint") == row["round"])
        write(self, row)

    monkeypatch.setattr(MetricsLog, "write", checking)
    for flower_round in (0, 1):
        rounds.begin(flower_round, server.slm_adapter)
        rounds.evaluate(flower_round, server.slm_adapter)
    assert checkpointed_first == [True, True]
    assert [r["round"] for r in load_checkpoint(tmp_path / "checkpoint", server.config).rows] == [
        0,
        1,
    ]
