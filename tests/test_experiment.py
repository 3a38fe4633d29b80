"""The paper's comparison: methods, budgets, resume, and the tables built from results."""

from __future__ import annotations

import errno
import json
import math
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedcollm.config import ConfigError, load_config
from fedcollm.experiments import methods as experiment
from fedcollm.experiments.methods import Method, register_method
from fedcollm.experiments.runs import load_results, method_config, run_experiment
from fedcollm.experiments.tables import compare, mean_ci, table1, write_experiment_report
from fedcollm.registry import METHODS

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def test_mean_and_95_percent_interval():
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(mean_ci([0.4])[1])


def _result(method, seed, llm=None, global_=None, clients=None, task="arc_easy"):
    score = lambda a: None if a is None else {"acc": a, "acc_norm": a / 2, "n": 10}  # noqa: E731
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "llm": score(llm),
        "slm_global": score(global_),
        "slm_clients": None if clients is None else [score(c) for c in clients],
    }


def test_table1_averages_clients_then_seeds_and_omits_what_a_method_lacks():
    results = [
        _result("fedcollm", 0, llm=0.5, global_=0.4, clients=[0.2, 0.4]),
        _result("fedcollm", 1, llm=0.7, global_=0.6, clients=[0.4, 0.6]),
        _result("standalone", 0, clients=[0.1, 0.3]),
    ]
    text = table1(results)
    ci = 100 * 12.706 * 0.1414213562 / math.sqrt(2)

    # (se): the standard error one seed's accuracy p has on n = 10 questions, as lm-eval's
    # (results without a stored stderr: binomial), averaged over clients and seeds.
    def se(*shares):
        return 100 * statistics.fmean(math.sqrt(p * (1 - p) / 9) for p in shares)

    assert f"| LLM | FedCoLLM | 60.0 ± {ci:.1f} (se {se(0.5, 0.7):.1f}) |" in text
    clients = se(0.2, 0.4, 0.4, 0.6)
    assert f"| SLM, clients' own adapters | FedCoLLM | 40.0 ± {ci:.1f} (se {clients:.1f}) |" in text
    assert f"| SLM, clients' own adapters | Standalone | 20.0 (se {se(0.1, 0.3):.1f}) |" in text
    # A stored standard error (a generative metric's, say) is used as it is.
    stored = _result("fedcollm", 0, llm=0.5)
    stored["llm"]["acc_stderr"] = 0.123
    assert "| LLM | FedCoLLM | 50.0 (se 12.3) |" in table1([stored])
    assert "Centralized" not in text  # no such runs
    assert "| LLM | FedCoLLM | 30.0" in table1(results, "acc_norm")


def _record_budgets(monkeypatch):
    seen = []
    real = experiment.fine_tune

    def recording(model, examples, **kwargs):
        seen.append({"examples": len(examples), **kwargs})
        return real(model, examples, **kwargs)

    monkeypatch.setattr(experiment, "fine_tune", recording)
    return seen


def test_baselines_get_the_federated_budget_and_runs_resume(
    tmp_path, data_dir, monkeypatch, capsys
):
    config = load_config(TINY, data_dir=str(data_dir))
    seen = _record_budgets(monkeypatch)
    results = run_experiment(
        config, ["zero-shot", "standalone", "centralized"], [0], ["arc_easy"], tmp_path
    )
    # Scoring says when it starts and what it found: a real model takes minutes.
    printed = capsys.readouterr().out
    assert printed.count("LLM: scoring 40 questions") == 2  # zero-shot and centralized
    assert "client 2: scoring 40 questions" in printed
    assert re.search(r"  SLM: acc 0\.\d{3} \(\d+ s\)", printed)
    assert {r["method"] for r in results} == {"zero-shot", "standalone", "centralized"}
    standalone = [s for s in seen if s["lr"] == config.client.lr]
    assert len(standalone) == config.num_clients
    assert all(s["max_steps"] == config.rounds * config.client.max_steps for s in standalone)
    assert all(s["examples"] == 50 for s in standalone)  # each client's own D_k only
    (central,) = [s for s in seen if s["lr"] == config.distill.llm_lr]
    assert central["examples"] == config.data.train_limit  # D_a and every D_k
    # The final adapters are kept, each loadable with PEFT and scoring what the result says.
    runs = tmp_path / "runs" / "arc_easy"
    kept = sorted(p.parent.name for p in runs.glob("*/seed0/adapters/*/adapter_config.json"))
    assert kept == ["client0", "client1", "client2", "llm"]
    from fedcollm.data import evaluation_questions
    from fedcollm.evaluation import score
    from fedcollm.models import build_llm
    from fedcollm.models.lora import load_saved_adapter

    llm, tokenizer = build_llm(config)
    llm = load_saved_adapter(llm.get_base_model(), runs / "centralized/seed0/adapters/llm")
    central_result = next(r for r in results if r["method"] == "centralized")
    rescored = score(llm, tokenizer, config, evaluation_questions(config))
    assert rescored.mean("acc") == central_result["llm"]["acc"]
    steps = config.num_clients * config.client.max_steps + config.distill.kd_steps
    assert central["max_steps"] == config.rounds * steps

    # A re-run on the same directory keeps what is there and runs nothing.
    for method in METHODS.values():  # nothing may run again
        monkeypatch.setitem(METHODS._members, method.name, replace(method, run=None))
    again = run_experiment(
        config, ["zero-shot", "standalone", "centralized"], [0], ["arc_easy"], tmp_path
    )
    assert again == results
    # ...but never under another config: old and new results would mix silently.
    other = load_config(TINY, data_dir=str(data_dir), overrides=["client.lr=0.05"])
    with pytest.raises(ConfigError, match=r"seed0 was run with another config \(client.lr differ"):
        run_experiment(other, ["zero-shot", "standalone"], [0], ["arc_easy"], tmp_path)
    report = write_experiment_report(tmp_path)
    assert "| LLM | Centralized |" in report.read_text()
    # One line per client model and metric (acc, acc_norm).
    assert (tmp_path / "results.csv").read_text().count("slm_client") == 2 * (
        config.num_clients + 1
    )


def test_a_half_finished_or_damaged_experiment_reports_what_finished(tmp_path, capsys, monkeypatch):
    import shutil

    from fedcollm import cli

    out = tmp_path / "exp"
    shutil.copytree(Path(__file__).parents[1] / "docs" / "results" / "arc_easy_cpu", out)
    runs = out / "runs" / "arc_easy"
    (runs / "centralized" / "seed1" / "result.json").write_text("{}")
    truncated = runs / "fedavg" / "seed2" / "result.json"
    truncated.write_text(truncated.read_text()[:100])
    (runs / "fedcollm" / "seed2" / "result.json").unlink()  # a run still going
    before = (out / "results.csv").read_text()
    assert cli.main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    said = report.split("## Not in this report")[1]
    assert "centralized seed1:" in said and "fedavg seed2:" in said and "damaged" in said
    assert "arc_easy fedcollm seed2: not finished" in said
    assert "12 runs; seeds [0, 1, 2]" in report
    assert (out / "results.csv").read_text() != before  # every output from the same results
    capsys.readouterr()
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert cli.main(["report", str(empty)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no finished run to report yet" in line
    (out / "sweep.json").write_text('{"grid": ')
    assert cli.main(["report", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "sweep.json is damaged" in line
    (out / "sweep.json").unlink()
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):  # as a read-only mount answers (root writes anywhere)
        if self.parent == out:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    assert cli.main(["report", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot write there (Read-only file system); copy the directory somewhere" in line


@pytest.mark.parametrize(("kd_steps", "per_round"), [(4, 3 * 4 + 4), (0, 3 * 4 + 13)])
def test_centralized_gets_as_many_steps_as_fedcollm_takes(
    tmp_path, data_dir, monkeypatch, kd_steps, per_round
):
    # FedCoLLM's steps per round: 3 clients x 4 local steps, then R on D_a, where R = 0 means
    # one pass over D_a's 50 rows in batches of 4: 13 steps.
    config = load_config(TINY, data_dir=str(data_dir), overrides=[f"distill.kd_steps={kd_steps}"])
    seen = _record_budgets(monkeypatch)
    run_experiment(config, ["centralized"], [0], ["arc_easy"], tmp_path)
    (central,) = seen
    assert central["max_steps"] == config.rounds * per_round


def test_compare_two_experiments(tmp_path):
    for name, acc in (("a", 0.5), ("b", 0.6)):
        run = tmp_path / name / "runs" / "arc_easy" / "fedcollm" / "seed0"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(_result("fedcollm", 0, llm=acc)))
    text = compare(tmp_path / "a", tmp_path / "b")
    assert "| LLM | FedCoLLM | arc_easy | 50.0 (se 16.7) | 60.0 (se 16.3) | +10.0 |" in text


def test_fedavg_aux_keeps_d_a_and_drops_only_the_distillation():
    config = load_config(TINY)
    run = method_config(config, "arc_easy", "fedavg-aux", 0)
    assert run.distill.enabled and run.distill.kd_weight == 0.0
    assert config.distill.kd_weight == 1.0  # the experiment's own config is untouched
    results = [_result("fedavg-aux", 0, llm=0.5, global_=0.4, clients=[0.2, 0.4])]
    text = table1(results)
    assert "| SLM, global adapter | FedAvg + D_a (kd_weight 0) | 40.0" in text
    assert "| LLM | FedAvg + D_a (kd_weight 0) | 50.0" in text


def test_fedcollm_selective_gates_by_position_unless_the_config_names_a_gate():
    config = load_config(TINY)
    assert method_config(config, "arc_easy", "fedcollm-selective", 0).distill.selection == (
        "position"
    )
    assert method_config(config, "arc_easy", "fedcollm", 0).distill.selection == "none"
    by_example = load_config(TINY, overrides=['distill.selection="example"'])
    run = method_config(by_example, "arc_easy", "fedcollm-selective", 0)
    assert run.distill.selection == "example"
    results = [_result("fedcollm-selective", 0, llm=0.5, global_=0.4, clients=[0.2, 0.4])]
    assert "| SLM, global adapter | FedCoLLM, selective distillation | 40.0" in table1(results)


@pytest.mark.slow
def test_a_sweep_runs_its_grid_and_reports_each_value_with_paired_verdicts(tmp_path, data_dir):
    """Two kd_weight values x two methods, one round and one seed (per-seed verdicts are
    test_significance's), then a re-run that keeps everything."""
    from fedcollm import cli

    args = [
        "experiment", str(TINY), "--methods", "fedavg,fedcollm", "--seeds", "1",
        "--sweep", "distill.kd_weight=0,1", "--data-dir", str(data_dir), "--out", str(tmp_path),
        "--set", "rounds=1",
    ]  # fmt: skip
    assert cli.main(args) == 0
    points = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert points == ["distill.kd_weight=0", "distill.kd_weight=1"]
    results = [r for p in points for r in load_results(tmp_path / "sweep" / p)]
    assert len(results) == 4
    assert {r["config"]["distill"]["kd_weight"] for r in results} == {0.0, 1.0}
    # FedCoLLM at kd_weight 0 is FedAvg + D_a (test_fedavg_aux_keeps_d_a_and_drops_only_...):
    # both models train on D_a's cross-entropy; omega's B, zero at its init, has moved.
    point = tmp_path / "sweep" / "distill.kd_weight=0" / "runs" / "arc_easy" / "fedcollm" / "seed0"
    llm = load_file(point / "adapters" / "llm" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in llm.items() if "lora_B" in k)
    (aux,) = [
        r for r in results if r["method"] == "fedcollm" and r["config"]["distill"]["kd_weight"] == 0
    ]
    assert aux["llm"] is not None and aux["history"][-1]["distill_llm_ce"] > 0
    assert aux["history"][-1]["aggregate_sha256"] != aux["history"][-1]["distilled_sha256"]
    for r in (r for r in results if r["method"] == "fedavg"):  # FedCoLLM without distillation
        assert r["llm"] is None and r["config"]["distill"]["enabled"] is False
        row = r["history"][-1]
        assert "distill_slm_kd" not in row and row["aggregate_sha256"] == row["distilled_sha256"]
    for r in results:  # per-question predictions in every result, for every scored model
        clients = r["predictions"]["slm_clients"]
        assert len(clients) == 3 and all(len(c["id"]) == c["acc"].__len__() > 0 for c in clients)
        assert r["predictions"]["slm_global"]["id"] == clients[0]["id"]
    report = (tmp_path / "report.md").read_text()
    assert "| model | method | distill.kd_weight = 0.0 | distill.kd_weight = 1.0 |" in report
    assert "| SLM, global adapter | FedCoLLM |" in report
    assert (tmp_path / "sweep_arc_easy_distill.kd_weight.png").stat().st_size > 10_000
    for point in points:
        assert f"## {point}" in report
        assert (tmp_path / f"{point}_significance_arc_easy.png").is_file()
    assert report.count("| clients' SLMs: FedCoLLM - FedAvg | acc | 1 x 40 |") == 2
    assert report.count("seed 0: ") >= 2  # McNemar per seed
    for claim in ("gain over Standalone", "97-99% of Centralized", "about 0.24% of the SLM"):
        assert report.count(claim) == 2  # a verdict line per claim at each point
    # The tiny SLM (71k parameters, its adapter 8.7% of it) is not the paper's.
    assert "0.24% of the SLM**: not comparable (the paper's SLMs are" in report
    # A second run keeps every result and rebuilds the same report.
    assert cli.main(args) == 0
    assert (tmp_path / "report.md").read_text() == report


def test_the_per_round_plot_cuts_intervals_at_the_metrics_range_and_starts_at_zero_shot():
    from fedcollm.experiments.tables import _error_bars, _zero_shot

    # Two seeds' t-interval of a share near 1 would reach past 100%; a loss's past 0.
    assert _error_bars([(0.9, 0.3), (0.2, math.nan)], "acc") == [
        [0.3, 0.0],
        [pytest.approx(0.1), 0.0],
    ]
    assert _error_bars([(0.2, 0.5)], "target_loss") == [[0.2], [0.5]]
    assert _error_bars([(0.5, math.nan)], "acc") is None
    results = [
        {"task": "tfns", "method": "zero-shot", "llm": {"acc": 0.34}, "slm_global": {"acc": 0.19}},
        {"task": "tfns", "method": "fedavg", "llm": None, "slm_global": {"acc": 0.6}},
    ]
    assert _zero_shot(results, "tfns", "llm", "acc") == 0.34
    assert _zero_shot(results, "tfns", "slm", "acc") == 0.19
    assert _zero_shot(results, "medmcqa", "slm", "acc") is None


def test_a_swept_seed_moves_every_runs_seed(tmp_path, data_dir):
    from fedcollm import cli

    args = [
        "experiment", str(TINY), "--methods", "zero-shot", "--seeds", "2",
        "--sweep", "seed=0,5", "--data-dir", str(data_dir), "--out", str(tmp_path),
        "--set", "eval.limit=4",
    ]  # fmt: skip
    assert cli.main(args) == 0
    for point, seeds in (("seed=0", [0, 1]), ("seed=5", [5, 6])):
        results = load_results(tmp_path / "sweep" / point)
        assert sorted(r["seed"] for r in results) == seeds
        assert sorted(r["config"]["seed"] for r in results) == seeds


@pytest.fixture
def zero_shot_llm():
    """A toy method, registered in one place: the zero-shot LLM alone, compared with the
    zero-shot method's."""
    zero_shot = METHODS["zero-shot"]
    register_method(
        Method(
            "zero-shot-llm",
            "Zero-shot, LLM only",
            "Zero-shot LLM",
            zero_shot.run,
            ("llm",),
            trains=False,
            default=False,
            pairs=(("llm", "zero-shot"),),
        )
    )
    yield
    METHODS.unregister("zero-shot-llm")


def test_a_method_registered_in_one_place_runs_and_is_reported(tmp_path, data_dir, zero_shot_llm):
    from fedcollm import cli

    args = [
        "experiment", str(TINY), "--methods", "zero-shot,zero-shot-llm", "--seeds", "1",
        "--data-dir", str(data_dir), "--out", str(tmp_path), "--set", "eval.limit=4",
    ]  # fmt: skip
    assert cli.main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| LLM | Zero-shot, LLM only |" in report
    assert "| SLM, clients' own adapters | Zero-shot, LLM only |" not in report
    assert "LLM: Zero-shot LLM - Zero-shot | acc | 1 x 4 |" in report


def test_baselines_take_each_clients_own_budget_under_heterogeneous_compute(
    tmp_path, data_dir, monkeypatch
):
    """Standalone client k does what it does in the federation, round for round: its
    profile's batch size and the steps the deadline leaves it; Centralized the sum."""
    profiles = "client.profiles=[{clients=[1, 2], speed=0.25, batch_size=2}]"
    overrides = [profiles, "client.deadline_s=8", 'client.late="partial"', "distill.kd_steps=3"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    seen = _record_budgets(monkeypatch)
    run_experiment(config, ["standalone", "centralized"], [0], ["arc_easy"], tmp_path)
    *clients, central = seen
    # rounds = 2; client 0: 4 steps a round at batch 4; clients 1, 2: 8 s x 0.25 = 2 steps.
    assert [(c["max_steps"], c["batch_size"]) for c in clients] == [(8, 4), (4, 2), (4, 2)]
    assert central["max_steps"] == 2 * (4 + 2 + 2 + 3)
