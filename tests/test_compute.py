"""Heterogeneous compute (issue 28): client profiles, a round deadline with its three
policies, and FedNova's normalisation, plain and under secure aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcollm import cli
from fedcollm.algorithm.aggregation import aggregation_rule, weighted_mean
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.compute import (
    DROPPED,
    ON_TIME,
    PARTIAL,
    WAITED,
    Budget,
    Schedule,
    client_budget,
    simulated_schedule,
)
from fedcollm.algorithm.round import reference_rounds
from fedcollm.config import ConfigError, load_config
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_digest, get_adapter

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
# Client 0 at full speed, clients 1 and 2 at a quarter: 4 steps take 4 s and 16 s.
PROFILES = "client.profiles=[{clients=[0], name='fast'}, {clients=[1, 2], name='slow', speed=0.25}]"


def test_a_profile_takes_what_it_leaves_out_from_the_client_table():
    config = load_config(TINY, overrides=[PROFILES, "client.batch_size=2"])
    assert client_budget(config, 0) == Budget(1, 4, 2, 1.0)
    assert client_budget(config, 2) == Budget(1, 4, 2, 0.25)
    assert config.client.profiles[1].name == "slow"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["client.profiles=[{clients=[3]}]"], "client.profiles[0].clients: 3 is not a client"),
        (
            ["client.profiles=[{clients=[0]}, {clients=[0, 1]}]"],
            "client.profiles[1].clients: client 0 is already in client.profiles[0]",
        ),
        (["client.profiles=[{clients=[]}]"], "client.profiles[0].clients: empty"),
        (["client.profiles=[{clients=[0], speed=0}]"], "client.profiles[0].speed: must be"),
        (["client.profiles=[{clients=[0], batch_size=0}]"], "profiles[0].batch_size: must be"),
        (["client.profiles=[{clients=[0], rank=4}]"], "unknown key 'client.profiles[0].rank'"),
        (["client.profiles=[1]"], "client.profiles: expected tables [[client.profiles]]"),
        (['client.late="partial"'], 'client.late = "partial" needs a deadline'),
        (["client.speed=0"], "client.speed: must be greater than 0"),
        (
            [
                'client.late="drop"',
                "client.deadline_s=5",
                "federation.secure_aggregation=true",
                "federation.min_clients=2",
            ],
            'client.late = "drop" is not available with secure_aggregation',
        ),
    ],
)
def test_a_bad_profile_is_refused_in_one_line_before_any_model_loads(
    capsys, tmp_path, overrides, fragment
):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(TINY, overrides=overrides)
    assert fragment in str(err.value)
    args = ["run", str(TINY), "--out", str(tmp_path / "out")]
    assert cli.main([*args, *(x for o in overrides for x in ("--set", o))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert fragment in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("late", "steps", "seconds", "outcome"),
    [("wait", 40, 40.0, WAITED), ("drop", 0, 10.0, DROPPED), ("partial", 10, 10.0, PARTIAL)],
)
def test_the_deadline_waits_drops_or_takes_partial_work(late, steps, seconds, outcome):
    config = load_config(TINY, overrides=[f'client.late="{late}"', "client.deadline_s=10"])
    slow = Budget(local_epochs=2, max_steps=0, batch_size=4, speed=1.0)  # 2 x 20 batches
    assert simulated_schedule(config, slow, 80) == Schedule(steps, seconds, outcome)
    fast = Budget(local_epochs=2, max_steps=0, batch_size=4, speed=4.0)
    assert simulated_schedule(config, fast, 80) == Schedule(40, 10.0, ON_TIME)
    crawling = Budget(1, 0, 4, 0.05)  # not one step by the deadline: partial work is none
    assert simulated_schedule(config, crawling, 80).outcome == (
        WAITED if late == "wait" else DROPPED
    )


def _updates(steps: list[int], sizes: list[int]) -> tuple[dict, list[ClientUpdate]]:
    generator = torch.Generator().manual_seed(0)
    broadcast = {
        "a": torch.randn(3, 4, generator=generator),
        "b": torch.randn(5, generator=generator),
    }
    updates = [
        ClientUpdate(
            {k: v + torch.randn(v.shape, generator=generator) for k, v in broadcast.items()},
            n,
            0.0,
            t,
        )
        for t, n in zip(steps, sizes, strict=True)
    ]
    return broadcast, updates


def test_fednova_is_its_formula_and_fedavg_when_steps_are_equal():
    """theta + tau_eff sum_k p_k (theta_k - theta) / tau_k, tau_eff = sum_k p_k tau_k."""
    fednova = aggregation_rule("fednova")
    steps, sizes = [8, 2, 5], [30, 10, 20]
    broadcast, updates = _updates(steps, sizes)
    p = [n / sum(sizes) for n in sizes]
    tau_eff = sum(pk * t for pk, t in zip(p, steps, strict=True))
    for key, theta in broadcast.items():
        expected = theta.double() + tau_eff * sum(
            pk * (u.adapter[key].double() - theta.double()) / t
            for pk, u, t in zip(p, updates, steps, strict=True)
        )
        got = fednova.aggregate(updates, broadcast)[key]
        torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)
    fedavg = aggregation_rule("num_examples").aggregate(updates, broadcast)
    assert any(
        (fedavg[k] - got).abs().max() > 1e-3
        for k, got in fednova.aggregate(updates, broadcast).items()
    )
    broadcast, equal = _updates([4, 4, 4], sizes)
    for key, value in fednova.aggregate(equal, broadcast).items():
        expected = aggregation_rule("num_examples").aggregate(equal, broadcast)[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_fednova_under_secure_aggregation_scales_each_upload_before_masking():
    """SecAgg+ computes only sum_k w_k x_k / sum_k w_k: each client uploads its rescaled
    adapter, the server turns the unmasked mean into FedNova's theta from the steps and
    sizes reported in the clear."""
    fednova = aggregation_rule("fednova")
    steps, sizes = [8, 2, 5], [30, 10, 20]
    broadcast, updates = _updates(steps, sizes)
    scale = fednova.upload_scale([8, 8, 8])
    uploads = [fednova.upload(u.adapter, broadcast, u.steps, scale) for u in updates]
    weights = fednova.weights(sizes)
    mean = weighted_mean(uploads, weights)  # what SecAgg+ hands the server
    theta = fednova.from_mean(mean, broadcast, steps, weights, scale)
    for key, value in fednova.aggregate(updates, broadcast).items():
        torch.testing.assert_close(theta[key], value, rtol=0, atol=1e-5)


def _slow_clients(data_dir, late: str, *more: str):
    overrides = [
        PROFILES,
        "client.deadline_s=8",  # client 0 needs 4 s, clients 1 and 2 need 16 s
        f'client.late="{late}"',
        'client.aggregation="fednova"',
        'data.partition="dirichlet"',  # unequal |D_k|: FedNova's p_k matter
        "rounds=1",
        "eval.limit=4",
        "federation.min_clients=1",
        *more,
    ]
    return load_config(TINY, data_dir=str(data_dir), overrides=overrides)


@pytest.mark.slow
@pytest.mark.parametrize("late", ["partial", "drop"])
def test_a_run_with_slow_clients_records_each_clients_steps_and_outcome(tmp_path, data_dir, late):
    config = _slow_clients(data_dir, late)
    row = simulate(config, tmp_path / "run")[1]
    if late == "partial":
        clients = [
            (c["partition"], c["steps"], c["clock_seconds"], c["outcome"]) for c in row["clients"]
        ]
        assert clients == [(0, 4, 4.0, ON_TIME), (1, 2, 8.0, PARTIAL), (2, 2, 8.0, PARTIAL)]
        assert row["dropped"] == []
    else:
        assert [c["partition"] for c in row["clients"]] == [0]
        dropped = [(d["partition"], d["steps"], d["outcome"]) for d in row["dropped"]]
        assert dropped == [(1, 0, DROPPED), (2, 0, DROPPED)]
        assert (
            "late: its budget needs more than client.deadline_s = 8 s" in row["dropped"][0]["error"]
        )
    assert row["clock_seconds"] == 8.0
    # The Flower run adds nothing: the in-process reference gives the same theta.
    (result,) = reference_rounds(config)
    assert adapter_digest(result.aggregate) == row["aggregate_sha256"]


@pytest.mark.slow
def test_fednova_with_partial_work_under_secagg_equals_the_plain_aggregate(
    tmp_path, data_dir, distilled_aggregates
):
    secure = ["federation.secure_aggregation=true", "federation.min_clients=2"]
    config = _slow_clients(data_dir, "partial", *secure)
    row = simulate(config, tmp_path / "secure")[1]
    assert [c["steps"] for c in row["clients"]] == [4, 2, 2] and row["secure_aggregation"]
    (secure_aggregate,) = distilled_aggregates  # before the reference adds its own
    (plain,) = reference_rounds(_slow_clients(data_dir, "partial"))
    errors = [(plain.aggregate[k] - v).abs().max().item() for k, v in secure_aggregate.items()]
    # SecAgg+'s quantisation (one step of 2 / 2**22 per client value), scaled by FedNova's
    # factors (at most 2 here) and back: a few steps, not bit-equal.
    assert 0 < max(errors) <= 4 * 3 * 2 / 2**22


def test_on_the_wall_clock_a_late_client_stops_at_the_deadline(data_dir, monkeypatch):
    """Deployment: real seconds. Each reading of the clock here advances it a second, so
    the deadline of 2.5 s comes before the client's 4 planned steps are done."""
    from fedcollm.algorithm import client as client_module
    from fedcollm.algorithm import training
    from fedcollm.algorithm.round import in_process_clients

    overrides = ['client.clock="wall"', "client.deadline_s=2.5", 'client.late="partial"']
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    (client, *_) = in_process_clients(config)
    theta = get_adapter(client.slm)
    clock = iter(range(10_000))
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(client_module.time, "perf_counter", lambda: float(next(clock)))
    update = client.update(theta, 1)
    assert 0 < update.steps < 4 and update.outcome == PARTIAL and update.seconds > 2.5
    # Under "drop" a client does not stop: it finds itself late when it is done.
    drop = ['client.clock="wall"', "client.deadline_s=0.5", 'client.late="drop"']
    dropping = load_config(TINY, data_dir=str(data_dir), overrides=drop)
    (client, *_) = in_process_clients(dropping)
    assert client.update(theta, 1).outcome == DROPPED
