"""End to end in Flower's simulation engine with the tiny configuration."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from peft import PeftModel
from safetensors.torch import load_file

from fedcollm import seeds
from fedcollm.algorithm.round import reference_rounds
from fedcollm.config import ConfigError, load_config
from fedcollm.data import evaluation_questions
from fedcollm.federation.simulation import simulate
from fedcollm.federation.wire import record_to_adapter
from fedcollm.models import adapter_digest, load_model
from fedcollm.tracking.metrics import read_metrics, read_predictions, who_knows_more
from fedcollm.tracking.trackers import check_trackers

pytestmark = pytest.mark.slow
TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """One tiny run, recording every message the server pushes to a client."""
    pushed, pulled = [], []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def recording_push(self, messages):
        messages = list(messages)
        pushed.extend(messages)
        return push(self, messages)

    def recording_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        pulled.extend(replies)
        return replies

    InMemoryGrid.push_messages, InMemoryGrid.pull_messages = recording_push, recording_pull
    try:
        overrides = ["eval.clients=true", 'tracking=["tensorboard", "mlflow"]']
        config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
        out = tmp_path_factory.mktemp("tiny")
        simulate(config, out)
    finally:
        InMemoryGrid.push_messages, InMemoryGrid.pull_messages = push, pull
    return config, out, read_metrics(out / "metrics.jsonl"), pushed, pulled


def test_run_leaves_metrics_for_every_round(tiny_run):
    config, out, rows, _, _ = tiny_run
    n_arrays = len(load_file(out / "adapters" / "slm" / "adapter_model.safetensors"))
    assert [r["round"] for r in rows] == list(range(config.rounds + 1))
    zero_shot = rows[0]
    assert zero_shot["client_train_loss"] is None and zero_shot["clients"] == []
    for row in rows:
        for key in ("llm_acc", "llm_acc_norm", "slm_acc", "slm_acc_norm"):
            assert 0.0 <= row[key] <= 1.0
            n = row["eval_questions"]
            assert row[f"{key}_stderr"] == pytest.approx(
                math.sqrt(row[key] * (1 - row[key]) / (n - 1))
            )
        assert row["eval_questions"] == config.eval.limit
        assert 0 < row["llm_aux_loss"] < 20 and 0 < row["slm_aux_loss"] < 20
    for row in rows[1:]:
        assert len(row["clients"]) == config.num_clients
        assert row["client_train_loss"] > 0
        assert row["distill_slm_kd"] >= 0 and row["distill_llm_ce"] > 0
        assert set(row["seconds"]) >= {"clients", "aggregation", "distillation", "evaluation"}
        payload = 4 * row["adapter_params"]  # fp32
        for client in row["clients"]:
            # Flower serialises each array with np.save: a 128-byte header on top of the data,
            # which is 8% of this tiny adapter's 16 small arrays (negligible on real models).
            assert client["bytes_sent"] == client["bytes_received"]
            assert payload < client["bytes_sent"] <= payload + 128 * n_arrays


def test_the_summary_says_who_knows_more_before_the_first_round_and_after_the_last():
    def row(n, llm, slm, llm_loss, slm_loss, metrics=("acc", "acc_norm")):
        scores = {"llm_" + metrics[0]: llm, "slm_" + metrics[0]: slm}
        losses = {"llm_aux_loss": llm_loss, "slm_aux_loss": slm_loss}
        return {"round": n, "metrics": list(metrics), **scores, **losses}

    rows = [row(0, 0.70, 0.46, 2.9, 3.3), {"round": 1}, row(2, 0.71, 0.52, 2.4, 2.2)]
    head, before, after = who_knows_more(rows)
    assert "lower is better" in head
    assert before.startswith("  round 0 (zero-shot): LLM acc 0.700, D_a loss 2.900")
    assert before.endswith("-> the LLM on both")
    assert after.startswith("  after round 2:")
    assert after.endswith("-> the LLM scores higher, the SLM has the lower D_a loss")
    # A lower-is-better headline reads the other way round.
    (_, only) = who_knows_more([row(0, 1.5, 1.2, 2.0, 2.5, ("target_loss", "rougeL"))])
    assert only.endswith("-> the SLM scores higher, the LLM has the lower D_a loss")
    assert who_knows_more([{"round": 0, "llm_acc": 0.5}]) == []  # rows of older runs
    (_, nothing_right) = who_knows_more([row(0, 0.0, 0.0, 2.0, 2.5)])  # 0% is a score too
    assert nothing_right.endswith("-> the same score, the LLM has the lower D_a loss")


def test_clients_score_their_own_adapter_after_the_last_local_update(tiny_run):
    config, _, rows, _, pulled = tiny_run
    assert all("own_acc" not in c for r in rows[:-1] for c in r["clients"])
    last = rows[-1]["clients"]
    assert len(last) == config.num_clients
    assert all(0 <= c["own_acc"] <= 1 and 0 <= c["own_acc_norm"] <= 1 for c in last)
    # The scored adapter is the one each client sent after its last local update (fp32 on
    # the wire, so the same digest), not the theta it received.
    sent = {
        int(r.content["metrics"]["partition"]): adapter_digest(
            record_to_adapter(r.content["arrays"])
        )
        for r in pulled[-config.num_clients :]
    }
    for client in last:
        assert client["scored_sha256"] == sent[client["partition"]]
        assert client["scored_sha256"] != rows[-1]["broadcast_sha256"]


def test_clients_receive_the_distilled_adapter_not_the_plain_average(tiny_run):
    _, _, rows, _, _ = tiny_run
    for previous, current in zip(rows[1:], rows[2:], strict=False):
        assert previous["distilled_sha256"] != previous["aggregate_sha256"]
        assert current["broadcast_sha256"] == previous["distilled_sha256"]
        assert {c["received_sha256"] for c in current["clients"]} == {previous["distilled_sha256"]}


def test_no_message_to_a_client_holds_the_llm_or_its_adapter(tiny_run, data_dir):
    config, out, rows, pushed, _ = tiny_run
    assert len(pushed) == config.rounds * config.num_clients
    slm_keys = set(
        json.loads((out / "adapters" / "slm" / "adapter_config.json").read_text())["target_modules"]
    )
    llm_adapter = PeftModel.from_pretrained(
        load_model(config.llm, seeds.llm_weights(config.seed))[0], out / "adapters" / "llm"
    )
    llm_shapes = {tuple(p.shape) for n, p in llm_adapter.named_parameters() if "lora_" in n}
    for message in pushed:
        records = dict(message.content.items())
        assert set(records) == {"arrays", "config"}
        assert set(message.content["config"]) <= {"server-round", "evaluate-own"}
        arrays = record_to_adapter(message.content["arrays"])
        assert sum(t.numel() for t in arrays.values()) == rows[-1]["adapter_params"]
        assert all(any(m in key for m in slm_keys) for key in arrays)
        # The tiny LLM is wider than the SLM: none of its LoRA shapes may appear.
        assert not {tuple(t.shape) for t in arrays.values()} & llm_shapes


def test_replies_hold_only_what_docs_messages_lists(tiny_run):
    config, _, rows, pushed, pulled = tiny_run
    assert len(pulled) == len(pushed)
    documented = {
        "partition",
        "num-examples",
        "train_loss",
        "steps",
        "bytes_received",
        "seconds",
        "clock_seconds",
        "own_acc",
        "own_acc_stderr",
        "own_acc_norm",
        "own_acc_norm_stderr",
    }
    receipt = {"received_sha256", "outcome", "scored_sha256", "own_predictions"}
    for reply in pulled:
        assert set(dict(reply.content.items())) == {"arrays", "metrics", "receipt"}
        assert set(reply.content["metrics"]) <= documented
        assert "received_sha256" in reply.content["receipt"]
        assert set(reply.content["receipt"]) <= receipt
        arrays = record_to_adapter(reply.content["arrays"])
        assert sum(t.numel() for t in arrays.values()) == rows[-1]["adapter_params"]


def test_final_adapters_load_with_peft_and_match_the_last_evaluation(tiny_run):
    config, out, rows, _, _ = tiny_run
    base, _ = load_model(config.slm, seeds.slm_weights(config.seed))
    slm = PeftModel.from_pretrained(base, out / "adapters" / "slm")
    trained = [p for n, p in slm.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)
    saved = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
    assert adapter_digest(saved) == rows[-1]["distilled_sha256"]
    assert (out / "adapters" / "llm" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["task"] == config.task


def test_the_flower_run_adds_nothing_to_the_algorithm(tiny_run):
    """The reference round in this process, with no Flower at all, gives the theta the
    simulated federation gave, bit for bit, in every round: before and after distillation.
    (So a second run with the same seed gives the same adapters, and the same scores.)"""
    config, _, rows, _, _ = tiny_run
    results = list(reference_rounds(config))
    assert len(results) == config.rounds
    for row, result in zip(rows[1:], results, strict=True):
        assert adapter_digest(result.aggregate) == row["aggregate_sha256"]
        assert adapter_digest(result.slm_adapter) == row["distilled_sha256"]


def test_each_scored_model_keeps_what_it_answered_per_question(tiny_run, data_dir):
    config, out, rows, _, _ = tiny_run
    questions = evaluation_questions(config)
    last = read_predictions(out, config.rounds)
    assert set(last) == {"llm", "slm", "clients"}
    for role in ("llm", "slm"):
        answered = last[role]
        assert answered["id"] == [q.id for q in questions]
        # The answer is the choice of highest log-likelihood; acc says whether it is gold.
        for q, answer, lls, acc in zip(
            questions,
            answered["answer"],
            answered["choice_loglikelihoods"],
            answered["acc"],
            strict=True,
        ):
            assert answer == max(range(len(lls)), key=lls.__getitem__)
            assert acc == float(answer == q.gold)
        assert statistics.fmean(answered["acc"]) == pytest.approx(rows[-1][f"{role}_acc"])
    # Every client's own adapter, by partition, as its own score says.
    own = {c["partition"]: c["own_acc"] for c in rows[-1]["clients"]}
    assert sorted(last["clients"]) == [str(k) for k in range(config.num_clients)]
    for partition, answered in last["clients"].items():
        assert statistics.fmean(answered["acc"]) == pytest.approx(own[int(partition)])
    assert "own_predictions" not in rows[-1]["clients"][0]  # the metrics row stays small


def test_the_run_plot_draws_the_majority_floor(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from fedcollm.tracking.report import plot_accuracy

    drawn = []
    real = Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda ax, y=0, **kw: drawn.append(y) or real(ax, y, **kw))
    row = {"task": "t", "eval_questions": 60, "eval_split": "validation", "llm_majority": 0.3}
    rows = [{**row, "round": n, "llm_acc": 0.5, "slm_acc": 0.4 + n / 10} for n in (0, 1)]
    rows = [{**r, "llm_acc_norm": 0.5, "slm_acc_norm": 0.5} for r in rows]
    plot_accuracy(rows, tmp_path / "accuracy.png")
    assert drawn == [0.3] and (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_the_run_plots_legend_covers_no_point(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from fedcollm.tracking.report import plot_accuracy

    legends = []
    real = Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda ax, *a, **kw: legends.append(real(ax, *a, **kw)))
    row = {"task": "t", "eval_questions": 60, "eval_split": "validation", "llm_majority": 0.3}
    rows = [{**row, "round": n, "llm_acc": 0.75, "llm_acc_norm": 0.72} for n in (0, 2)]
    rows = [{**r, "slm_acc": 0.5, "slm_acc_norm": 0.5} for r in rows]
    plot_accuracy(rows, tmp_path / "accuracy.png")
    (legend,) = legends  # one legend, outside the axes that hold the points
    assert not legend.get_window_extent().overlaps(legend.axes.get_window_extent())


def test_a_tracker_that_would_fail_later_refuses_the_run_before_it_starts(
    tmp_path, data_dir, monkeypatch, capsys
):
    from fedcollm import cli

    out = tmp_path / "run"
    out.mkdir()
    args = ["run", str(TINY), "--data-dir", str(data_dir), "--out", str(out)]

    def refused(tracking: str, fragment: str) -> None:
        assert cli.main([*args, "--set", f"tracking={tracking}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert fragment in line, line
        assert not (out / "config.json").exists()  # nothing started

    (out / "tensorboard").write_text("")
    refused('["tensorboard"]', "tensorboard is a file where TensorBoard writes")
    (out / "mlflow.db").mkdir()
    refused('["mlflow"]', "mlflow.db is a directory where MLflow's database goes")
    (out / "mlflow.db").rmdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    refused('["mlflow"]', "the MLflow server at http://127.0.0.1:9 does not answer")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for damaged in ("{", "[]", '{"tracking_uri": "x"}'):
        (out / "mlflow_run.json").write_text(damaged)
        refused('["mlflow"]', "mlflow_run.json is damaged (no MLflow run id in it); remove it")
    marker = {"run_id": "x", "tracking_uri": "sqlite:////elsewhere/mlflow.db"}
    (out / "mlflow_run.json").write_text(json.dumps(marker))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(ConfigError, match="this run logged to MLflow at sqlite:////elsewhere"):
        check_trackers(["mlflow"], out)


def test_every_round_reaches_tensorboard_and_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, out, rows, _, _ = tiny_run
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    series = {
        "slm_acc": [(r["round"], r["slm_acc"]) for r in rows],
        "client_train_loss": [(r["round"], r["client_train_loss"]) for r in rows[1:]],
        "client_0/train_loss": [(r["round"], r["clients"][0]["train_loss"]) for r in rows[1:]],
        "seconds/distillation": [(r["round"], r["seconds"]["distillation"]) for r in rows[1:]],
    }
    for key, expected in series.items():
        events = board.Scalars(key)
        assert [e.step for e in events] == [step for step, _ in expected]
        assert [e.value for e in events] == pytest.approx([v for _, v in expected], rel=1e-6)
    marker = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=marker["tracking_uri"])
    history = client.get_metric_history(marker["run_id"], "slm_acc")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["slm_acc"]) for r in rows]
    run = client.get_run(marker["run_id"])
    assert run.data.params["rounds"] == str(config.rounds) and run.info.status == "FINISHED"


@pytest.mark.parametrize(
    ("task", "metrics"),
    [
        ("tfns", ("acc", "acc_norm", "flowertune_finance", "majority")),
        ("code_alpaca", ("rougeL", "target_loss", "exact_match")),
    ],
)
def test_a_domain_task_runs_through_fedcollm_run(tmp_path, data_dir, task, metrics):
    """`fedcollm run configs/tiny.toml --set task=...` on a finance and an instruction task:
    both models scored on the task's metrics, the distillation's losses finite."""
    from fedcollm import cli

    sets = [f"task={task}", "rounds=1", "eval.limit=6", "client.max_steps=2"]
    args = ["run", str(TINY), "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 0
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["task"] == task and last["eval_questions"] == 6
    for role in ("llm", "slm"):
        assert all(math.isfinite(last[f"{role}_{m}"]) for m in metrics)
    assert all(math.isfinite(last[f"distill_{m}_kd"]) for m in ("slm", "llm"))
