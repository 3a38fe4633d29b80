"""Clients of several SLM families (issue 28 §3): clients group by their SLM, each group has
its own theta and receives nothing of the others', and the LLM distils with every group at
once, toward the mean of its distances to them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tinymodels import PAD, examples, nudge_lora_b, tiny_lora_model

from fedcollm import cli
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.distillation import MutualDistillation, distil_groups
from fedcollm.algorithm.grouped_server import GroupedServer
from fedcollm.algorithm.groups import (
    join,
    member_config,
    part,
    slm_groups,
)
from fedcollm.algorithm.round import reference_rounds
from fedcollm.config import Config, ConfigError, DistillConfig, LoraConfig, OptimConfig, load_config
from fedcollm.experiments.grouped import _group_row
from fedcollm.experiments.runs import run_experiment
from fedcollm.experiments.tables import write_experiment_report
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_digest, get_adapter
from fedcollm.preflight import check_run
from fedcollm.tracking.metrics import summary_table

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = CONFIGS / "tiny.toml"
PIECES = 'slm={tiny={tokenizer="pieces"}}'  # another tokenizer: another family, in tiny
SECURE = ["federation.secure_aggregation=true", "federation.min_clients=2"]
TWO_GROUPS = ["num_clients=4", f"client.profiles=[{{clients=[2, 3], {PIECES}}}]"]


def test_clients_group_by_their_slm_in_the_order_of_their_first_client():
    profiles = f"client.profiles=[{{clients=[1, 3], {PIECES}}}, {{clients=[4], lora_r=4}}]"
    config = load_config(TINY, overrides=["num_clients=5", profiles])
    groups = slm_groups(config)
    # Client 4's profile changes its rank, not its SLM: it stays in the [slm] group.
    assert [(g.name, g.clients) for g in groups] == [("tiny", (0, 2, 4)), ("tiny-2", (1, 3))]
    assert member_config(config, 3).slm.tiny.tokenizer == "pieces"
    assert member_config(config, 3).slm.tiny.hidden_size == config.slm.tiny.hidden_size
    assert member_config(config, 4).slm == config.slm


def test_a_joined_theta_gives_each_group_back_its_own():
    a = {"x.lora_A.weight": torch.ones(2, 3)}
    b = {"x.lora_A.weight": torch.zeros(4, 3), "y.lora_B.weight": torch.ones(3, 4)}
    joined = join({"qwen": a, "smol-2": b})
    assert set(joined) == {
        "qwen/x.lora_A.weight",
        "smol-2/x.lora_A.weight",
        "smol-2/y.lora_B.weight",
    }
    assert part(joined, "qwen").keys() == a.keys() and part(joined, "smol-2").keys() == b.keys()
    assert torch.equal(part(joined, "smol-2")["x.lora_A.weight"], b["x.lora_A.weight"])


def _pair(seed: int = 0):
    # No LoRA dropout: two copies of one SLM then take exactly the same steps.
    config = Config(lora=LoraConfig(dropout=0.0))
    llm = tiny_lora_model(hidden=48, layers=2, seed=1, config=config)
    slm = tiny_lora_model(hidden=32, layers=2, seed=seed, config=config)
    nudge_lora_b(llm, seed=3)
    nudge_lora_b(slm, seed=4)
    return llm, slm


def test_the_llm_steps_toward_the_mean_of_its_distances_to_the_groups():
    # Two groups holding copies of one SLM: the mean of two equal distances is the distance
    # to one, so the LLM, and each SLM, take exactly Algorithm 1's steps with a single SLM
    # (a sum over the groups would double the LLM's distance term).
    cfg = DistillConfig(kd_steps=2, batch_size=2, slm_lr=1e-3, llm_lr=1e-2, kd_weight=2.0)
    llm, slm = _pair()
    grouped_llm, first, second = copy.deepcopy(llm), copy.deepcopy(slm), copy.deepcopy(slm)
    alone = MutualDistillation(llm, slm, cfg, OptimConfig()).run(examples(), PAD, seed=0)
    groups = [MutualDistillation(grouped_llm, s, cfg, OptimConfig()) for s in (first, second)]
    groups[1].llm_optimizer = groups[0].llm_optimizer
    records = distil_groups(groups, [examples(), examples()], [PAD, PAD], seed=0)
    for key, value in get_adapter(llm).items():
        assert torch.allclose(get_adapter(grouped_llm)[key], value, atol=5e-5), key
    for copy_ in (first, second):
        for key, value in get_adapter(slm).items():
            assert torch.allclose(get_adapter(copy_)[key], value, atol=5e-5), key
    assert records[0].llm_kd == pytest.approx(alone.llm_kd, rel=1e-4)
    assert records[1].slm_ce == pytest.approx(alone.slm_ce, rel=1e-4) and not records[1].llm_ce


def test_the_llm_learns_from_a_group_that_differs():
    # A second, different SLM changes the LLM's step: its distance term is in the mean.
    cfg = DistillConfig(kd_steps=1, batch_size=2, slm_lr=1e-3, llm_lr=1e-2)
    llm, slm = _pair()
    other = _pair(seed=7)[1]
    one, two = copy.deepcopy(llm), copy.deepcopy(llm)
    distil_groups(
        [MutualDistillation(one, copy.deepcopy(slm), cfg, OptimConfig())], [examples()], [PAD], 0
    )
    groups = [MutualDistillation(two, s, cfg, OptimConfig()) for s in (copy.deepcopy(slm), other)]
    groups[1].llm_optimizer = groups[0].llm_optimizer
    distil_groups(groups, [examples(), examples()], [PAD, PAD], 0)
    assert any(not torch.equal(get_adapter(one)[k], v) for k, v in get_adapter(two).items())


# configs/hetero_models.toml on tiny models: the SmolLM2 group a tiny SLM with another
# tokenizer, as cheap a budget as runs.
TINY_SETS = {
    "llm.name": '"tiny"',
    "slm.name": '"tiny"',
    "client.profiles": '[{name="SmolLM2", clients=[2, 3], slm={tiny={tokenizer="pieces"}}}]',
    "rounds": "2",
    "client.max_steps": "2",
    "distill.kd_steps": "2",
    "eval.limit": "6",
    "eval.every": "1",
    "federation.client_cpus": "1",
}


def _tiny_hetero_models(**sets: str) -> Config:
    overrides = {**TINY_SETS, **sets}
    return load_config(CONFIGS / "hetero_models.toml", [f"{k}={v}" for k, v in overrides.items()])


def test_hetero_models_runs_on_flower_as_the_reference_and_each_group_gets_its_own_theta(
    tmp_path,
):
    config = _tiny_hetero_models()
    rows = simulate(config, tmp_path / "run")
    reference = list(reference_rounds(config))
    assert [r["distilled_sha256"] for r in rows[1:]] == [
        adapter_digest(r.slm_adapter) for r in reference
    ]
    # Round 2 broadcasts round 1's distilled thetas: each client got its own group's.
    first = reference[0].slm_adapter
    digests = {g.name: adapter_digest(part(first, g.name)) for g in slm_groups(config)}
    assert len(set(digests.values())) == 2, "the groups' thetas must differ by round 2"
    group = {0: "tiny", 1: "tiny", 2: "tiny-2", 3: "tiny-2"}
    assert {c["partition"]: c["received_sha256"] for c in rows[2]["clients"]} == {
        k: digests[g] for k, g in group.items()
    }
    for name in group.values():  # each group's SLM scored and distilled under its name
        assert rows[-1][f"slm[{name}]_acc"] is not None
        assert rows[-1][f"distill_slm[{name}]_kd"] > 0
        assert (tmp_path / "run" / "adapters" / "slm" / name / "adapter_config.json").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "SLM[tiny] acc" in report and "SLM[tiny-2] acc" in report


def test_a_grouped_servers_state_restores_every_groups_theta():
    config = _tiny_hetero_models(rounds="1")
    server = GroupedServer.from_config(config)
    (result,) = reference_rounds(config, server)
    restored = GroupedServer.from_config(config)
    assert adapter_digest(restored.slm_adapter) != adapter_digest(result.slm_adapter)
    restored.load_state_dict(server.state_dict())
    assert adapter_digest(restored.slm_adapter) == adapter_digest(result.slm_adapter)
    assert adapter_digest(get_adapter(restored.llm)) == adapter_digest(get_adapter(server.llm))


def test_the_summary_has_a_column_per_group():
    row = {
        "round": 1, "eval_questions": 6, "eval_split": "validation", "task": "t",
        "metrics": ["acc", "acc_norm"], "client_train_loss": 1.0, "seconds": {"round": 1.0},
        "llm_acc": 0.5, "slm[a]_acc": 0.25, "slm[b]_acc": 0.75,
    }  # fmt: skip
    head, _, line = summary_table([row]).splitlines()[:3]
    assert "SLM[a] acc" in head and "SLM[b] acc" in head
    assert "0.250" in line and "0.750" in line


@pytest.mark.parametrize(
    "sets, error",
    [
        (['distill.schedule="sequential"'], 'distill.schedule = "sequential"'),
        ([*SECURE, "privacy.clip_norm=1.0"], "DP under secure aggregation is not yet"),
        ([*SECURE, 'client.aggregation="fednova"'], '"fednova" under secure aggregation'),
        (["client.profiles=[{clients=[2], slm={nme=1}}]"], "unknown key 'client.profiles[0].slm."),
        (["client.profiles=[{clients=[2], slm='smol'}]"], "client.profiles[0].slm: expected a"),
        (['client.profiles=[{clients=[2], slm={device="gpu"}}]'], "client.profiles[0].slm.device"),
    ],
)  # fmt: skip
def test_bad_groups_are_refused_in_one_line_before_any_model_loads(sets, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, overrides=TWO_GROUPS + sets)


def test_an_unknown_slm_of_a_profile_is_refused_by_name():
    config = load_config(
        TINY, overrides=["client.profiles=[{clients=[1], slm={name='./no-model'}}]"]
    )
    with pytest.raises(ConfigError, match=r"client.profiles\[0\].slm.name: './no-model'"):
        check_run(config)


def test_an_audit_of_a_grouped_run_measures_client_0s_own_slm(tmp_path, capsys):
    # Client 0 holds the pieces-tokenizer SLM: its canaries are encoded, trained and ranked
    # by that SLM, its upload and its group's theta.
    profiles = '[{clients=[0, 1], slm={tiny={tokenizer="pieces"}}}]'
    sets = {"client.profiles": profiles, "rounds": "1", "client.max_steps": "0"}
    sets.update({"client.lr": "1e-2", "eval.limit": "8"})
    config = _tiny_hetero_models(**sets)
    assert member_config(config, 0).slm.tiny.tokenizer == "pieces"
    out = tmp_path / "audit"
    args = ["audit", str(CONFIGS / "hetero_models.toml"), "--out", str(out)]
    args += ["--candidates", "50", "--repeats", "20"]
    overrides = {**TINY_SETS, **sets}
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert cli.main(args) == 0, capsys.readouterr().err[-2000:]
    artefacts = json.loads((out / "audit.json").read_text())["artefacts"]
    assert list(artefacts) == ["base SLM", "client 0's upload", "global theta", "LLM with omega"]
    assert artefacts["client 0's upload"]["exposure"] > artefacts["base SLM"]["exposure"] + 1


def test_an_experiment_compares_the_methods_within_each_group(tmp_path):
    config = _tiny_hetero_models(rounds="1")
    methods = ["zero-shot", "standalone", "fedavg", "fedcollm"]
    results = run_experiment(config, methods, [0], [config.task], tmp_path)
    blocks = {r["task"] for r in results}
    assert blocks == {"arc_easy_demo [tiny]", "arc_easy_demo [tiny-2]"}
    run = json.loads((tmp_path / "runs/arc_easy_demo/fedcollm/seed0/result.json").read_text())
    last = run["history"][-1]
    for group, members in (("tiny", 2), ("tiny-2", 2)):
        mine = {r["method"]: r for r in results if r["task"].endswith(f"[{group}]")}
        assert mine.keys() == set(methods)
        # Each group's global SLM and clients are its own, not the other group's.
        assert mine["fedcollm"]["slm_global"]["acc"] == last[f"slm[{group}]_acc"]
        assert mine["fedcollm"]["history"][-1]["slm_acc"] == last[f"slm[{group}]_acc"]
        own_size = mine["fedcollm"]["history"][-1]["adapter_params"]
        assert own_size == last[f"adapter_params[{group}]"] == last["adapter_params"] // 2
        for method in ("standalone", "fedavg", "fedcollm"):
            assert len(mine[method]["slm_clients"]) == members, method
        assert mine["fedcollm"]["config"]["slm"]["tiny"]["tokenizer"] == (
            "pieces" if group == "tiny-2" else "bytes"
        )
    report = write_experiment_report(tmp_path).read_text()
    assert "arc_easy_demo [tiny-2]" in report and "arc_easy_demo [tiny]" in report


def test_a_groups_view_of_a_metrics_row_is_a_one_slm_row():
    row = {
        "round": 1, "llm_acc": 0.5, "slm[a]_acc": 0.25, "slm[a-2]_acc": 0.75,
        "distill_slm[a]_kd": 1.0, "distill_slm[a-2]_kd": 3.0, "distill_llm_kd": 2.0,
        "adapter_params": 30, "adapter_params[a]": 10, "adapter_params[a-2]": 20,
    }  # fmt: skip
    assert _group_row(row, "a") == {
        "round": 1, "llm_acc": 0.5, "slm_acc": 0.25, "distill_slm_kd": 1.0,
        "distill_llm_kd": 2.0, "adapter_params": 10,
    }  # fmt: skip


def test_each_groups_dp_noise_is_its_own_draw():
    # Seeded noise (tests only) keyed per group: two groups of one shape must not share it.
    sets = {"privacy.clip_norm": "1.0", "privacy.noise_multiplier": "1.0"}
    sets.update({"privacy.noise_source": '"seeded"', "distill.enabled": "false"})
    config = _tiny_hetero_models(**sets)
    server = GroupedServer.from_config(config)
    theta = server.slm_adapter
    still = [  # every client sends back what it got: the aggregate is theta plus noise
        ClientUpdate(server.broadcast_to(k, theta), 10, 1.0, 1, partition=k) for k in range(4)
    ]
    aggregate = server.server_update(still, theta, 1).aggregate
    noise = {k: v - theta[k] for k, v in aggregate.items()}
    first, second = part(noise, "tiny"), part(noise, "tiny-2")
    assert first.keys() == second.keys()
    assert all(v.abs().max() > 0 for v in first.values())
    assert not any(torch.equal(first[k], second[k]) for k in first)
