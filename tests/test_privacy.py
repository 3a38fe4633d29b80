"""Client-level DP: clipping, noise, the accountant, its budget and its checkpoint, client
sampling, and the post-processing argument; FFA-LoRA plain, secure and with DP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedcollm.algorithm.aggregation import weighted_mean
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.privacy import (
    PrivacyAccountant,
    clip_update,
    gaussian_noise,
    noise_key,
    update_norm,
)
from fedcollm.algorithm.ranks import product_error
from fedcollm.algorithm.round import reference_rounds, sampled_partitions
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import ConfigError, load_config
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_numel, get_adapter

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
DP = ["privacy.clip_norm=0.5", "privacy.noise_multiplier=2.0"]


def _adapter(*values: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(values[:2]), "b": torch.tensor(values[2:])}


def test_an_update_is_clipped_to_the_bound_and_a_small_one_is_left_alone():
    reference = _adapter(1, 1, 1, 1)
    far = _adapter(4, 5, 1, 1)  # update (3, 4, 0, 0): norm 5
    clipped, norm = clip_update(far, reference, 0.5)
    assert norm == pytest.approx(5.0)
    assert update_norm(clipped, reference) == pytest.approx(0.5, rel=1e-6)
    assert clipped["a"].tolist() == pytest.approx([1.3, 1.4])  # the direction is kept
    near = _adapter(1.1, 1, 1, 1)
    assert clip_update(near, reference, 0.5)[0]["a"].tolist() == near["a"].tolist()


def test_the_noise_has_the_asked_spread_and_only_seeded_noise_repeats():
    config = load_config(TINY, overrides=[*DP, 'privacy.noise_source="seeded"'])
    like = {"w": torch.zeros(400, 100)}
    key = noise_key(config.privacy, 0, 1, "server")
    noise = gaussian_noise(like, 0.3, key)["w"]
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(0.3, rel=0.02)
    assert torch.equal(
        noise, gaussian_noise(like, 0.3, noise_key(config.privacy, 0, 1, "server"))["w"]
    )
    assert not torch.equal(
        noise, gaussian_noise(like, 0.3, noise_key(config.privacy, 0, 2, "server"))["w"]
    )
    system = load_config(TINY, overrides=DP).privacy
    first, second = (gaussian_noise(like, 0.3, noise_key(system, 0, 1, "server")) for _ in "ab")
    assert not torch.equal(first["w"], second["w"])


def _classic_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """The textbook RDP bound for `rounds` Gaussian releases of noise multiplier `sigma`:
    min over orders a of rounds * a / (2 sigma^2) + log(1 / delta) / (a - 1)."""
    orders = [1 + x / 10 for x in range(1, 2000)]
    return min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in orders)


def test_the_accountant_composes_rounds_at_the_replace_one_sensitivity():
    config = load_config(TINY, overrides=DP)
    accountant = PrivacyAccountant(config)
    epsilons = [accountant.epsilon(t) for t in range(5)]
    assert epsilons[0] == 0 and all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
    delta = config.privacy.target_delta
    # One client replaced moves the clipped sum by 2C: sigma C of noise is sigma / 2 of it.
    # dp-accounting's conversion is tighter than the textbook one, never looser, and far
    # above what the add-or-remove sensitivity (C, a multiplier of sigma) would give.
    for t in (1, 4):
        assert epsilons[t] <= _classic_gaussian_epsilon(1.0, t, delta) + 1e-9
        assert epsilons[t] > 1.5 * _classic_gaussian_epsilon(2.0, t, delta)
    sampled = PrivacyAccountant(
        load_config(TINY, overrides=[*DP, "federation.clients_per_round=1"])
    )
    assert sampled.epsilon(4) < epsilons[4]  # amplification by sampling
    assert (
        PrivacyAccountant(load_config(TINY, overrides=["privacy.clip_norm=0.5"])).epsilon(1)
        == math.inf
    )


def test_the_budget_says_how_many_rounds_fit_and_the_state_round_trips():
    config = load_config(TINY, overrides=[*DP, "federation.clients_per_round=2"])
    accountant = PrivacyAccountant(config)
    assert accountant.rounds_within(accountant.epsilon(3), limit=10) == 3
    assert accountant.rounds_within(accountant.epsilon(3) - 1e-6, limit=10) == 2
    assert accountant.rounds_within(1e9, limit=4) == 4
    accountant.spend_round([0, 1])
    accountant.spend_round([0, 2])
    again = PrivacyAccountant(config)
    again.load_state_dict(accountant.state_dict())
    assert again.spent() == accountant.spent()
    assert again.participation == [2, 1, 1]
    # Whoever knows the sample sees client 0 in both rounds, at full price.
    full = PrivacyAccountant(load_config(TINY, overrides=DP))
    assert again.spent()["epsilon_known_sample"] == pytest.approx(full.epsilon(2))
    assert again.spent()["epsilon"] < full.epsilon(2)


def test_privacy_settings_that_make_no_sense_are_refused():
    with pytest.raises(ConfigError, match="privacy.clip_norm is 0"):
        load_config(TINY, overrides=["privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="without noise epsilon is infinite"):
        load_config(TINY, overrides=["privacy.clip_norm=1.0", "privacy.max_epsilon=3.0"])
    with pytest.raises(ConfigError, match='must be "uniform"'):
        load_config(TINY, overrides=[*DP, 'client.aggregation="num_examples"'])
    with pytest.raises(ConfigError, match="clients_per_round: 4 is more than num_clients"):
        load_config(TINY, overrides=["federation.clients_per_round=4"])
    with pytest.raises(ConfigError, match="target_delta"):
        load_config(TINY, overrides=[*DP, "privacy.target_delta=1.0"])
    # Nothing starts on a budget the first round breaks (it used to stop after round 0 with
    # an IndexError and a checkpoint no --resume could use), nor on noise that only overflows.
    one_round = PrivacyAccountant(load_config(TINY, overrides=DP)).epsilon(1)
    with pytest.raises(ConfigError, match=rf"first round alone spends \(epsilon {one_round:.3g}"):
        load_config(TINY, overrides=[*DP, f"privacy.max_epsilon={one_round * 0.99}"])
    assert load_config(TINY, overrides=[*DP, f"privacy.max_epsilon={one_round * 1.01}"])
    with pytest.raises(ConfigError, match="noise_multiplier: at most 1000, got 1e"):
        load_config(TINY, overrides=[*DP, "privacy.noise_multiplier=1e300"])


def test_sampling_is_seeded_uniform_and_without_replacement():
    config = load_config(TINY, overrides=["federation.clients_per_round=2", "num_clients=5"])
    draws = [sampled_partitions(config, t) for t in range(1, 501)]
    assert all(len(set(d)) == 2 and d == sorted(d) for d in draws)
    assert draws[:3] == [sampled_partitions(config, t) for t in (1, 2, 3)]
    counts = [sum(k in d for d in draws) for k in range(5)]
    assert all(170 < n < 230 for n in counts), counts  # 200 each expected
    assert sampled_partitions(load_config(TINY), 1) == [0, 1, 2]


def test_the_server_models_depend_on_the_clients_only_through_the_noised_sum(data_dir):
    """Post-processing: two federations whose clipped updates differ one by one but sum to
    the same leave the server's SLM and LLM identical, since the server reads nothing else."""
    overrides = [*DP, 'privacy.noise_source="seeded"', "privacy.clip_norm=1.0"]
    broadcast = None
    results = []
    for sign in (1.0, -1.0):
        server = CoTuningServer.from_config(
            load_config(TINY, data_dir=str(data_dir), overrides=overrides)
        )
        broadcast = server.slm_adapter
        torch.manual_seed(5)
        shift = {k: 0.01 * torch.randn_like(v) for k, v in broadcast.items()}
        updates = [
            ClientUpdate({k: v + sign * shift[k] for k, v in broadcast.items()}, 50, 1.0, 4),
            ClientUpdate({k: v - sign * shift[k] for k, v in broadcast.items()}, 50, 1.0, 4),
        ]
        result = server.server_update(updates, broadcast, 1)
        results.append((result.slm_adapter, get_adapter(server.llm)))
    (slm_a, llm_a), (slm_b, llm_b) = results
    assert all(torch.equal(slm_a[k], slm_b[k]) for k in slm_a)
    assert all(torch.equal(llm_a[k], llm_b[k]) for k in llm_a)


def test_plain_lora_loses_in_averaging_and_a_shared_a_loses_nothing():
    torch.manual_seed(0)
    shared_a = torch.randn(2, 6)
    clients = [
        {"m.lora_A.weight": torch.randn(2, 6), "m.lora_B.weight": torch.randn(5, 2)} for _ in "abc"
    ]

    def lora_aggregation_error(adapters, weights):  # against the mean of A and of B
        mean = weighted_mean(adapters, weights)
        return product_error(adapters, weights, [2] * len(adapters), mean)

    assert lora_aggregation_error(clients, [1 / 3] * 3) > 0.1
    ffa = [{**c, "m.lora_A.weight": shared_a} for c in clients]
    assert lora_aggregation_error(ffa, [1 / 3] * 3) < 1e-6  # float32 aggregate
    assert lora_aggregation_error(clients[:1], [1.0]) < 1e-6


@pytest.mark.slow
def test_a_dp_run_spends_its_budget_stops_there_and_resumes_with_a_larger_one(tmp_path, data_dir):
    """Also the one run that scores every other round (eval.every = 2): the last round,
    the budget's or the config's, is always scored."""
    common = [
        "rounds=4",
        "eval.limit=4",
        *DP,
        "federation.clients_per_round=2",
        "eval.clients=true",
        "eval.every=2",
    ]
    config = load_config(TINY, data_dir=str(data_dir), overrides=[*common, "privacy.max_epsilon=8"])
    rows = simulate(config, tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 3 would pass epsilon 8
    assert [r["round"] for r in rows if "slm_acc" in r] == [0, 2]
    assert "slm_acc" not in rows[1] and rows[1]["client_train_loss"] > 0  # trained, unscored
    assert (tmp_path / "accuracy.png").stat().st_size > 0  # the plot skips round 1
    epsilons = [r["epsilon"] for r in rows]
    assert epsilons[0] == 0 and epsilons[1] < epsilons[2] <= 8
    for row in rows[1:]:
        assert [c["partition"] for c in row["clients"]] == row["sampled_partitions"]
        assert row["sampled_partitions"] == sampled_partitions(config, row["round"])
        assert all(c["update_norm"] <= 0.5 + 1e-5 for c in row["clients"])  # clipped
        assert row["lora_aggregation_error"] > 0
    assert (tmp_path / "adapters" / "slm" / "adapter_model.safetensors").is_file()
    assert f"client-level DP: epsilon {epsilons[2]:.3g}" in (tmp_path / "report.md").read_text()
    # The budget's last round is the run's last: its clients score their own adapters.
    assert [sorted(c) for c in rows[1]["clients"] if "own_acc" in c] == []
    assert len(rows[2]["clients"]) == 2 and all("own_acc" in c for c in rows[2]["clients"])
    more = load_config(TINY, data_dir=str(data_dir), overrides=[*common, "privacy.max_epsilon=20"])
    resumed = simulate(more, tmp_path, resume=True)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    assert resumed[2]["epsilon"] < resumed[3]["epsilon"] < resumed[4]["epsilon"] <= 20
    assert resumed[3]["epsilon"] == pytest.approx(PrivacyAccountant(more).epsilon(3))
    assert all("own_acc" in c for c in resumed[4]["clients"])
    assert [r["round"] for r in resumed if "slm_acc" in r] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
        "round_0.json",
        "round_2.json",
        "round_4.json",
    ]


@pytest.mark.slow
def test_secure_dp_clients_add_noise_shares_that_sum_to_the_asked_noise(
    tmp_path, data_dir, monkeypatch
):
    """The same clipped updates with and without noise (seeded): under secure aggregation the
    difference is the clients' noise shares, each (sigma C)^2 / min_clients in variance."""
    aggregates = []
    co_tune = CoTuningServer.co_tune

    def recording(self, aggregate, *args, **kwargs):
        aggregates.append({k: v.clone() for k, v in aggregate.items()})
        return co_tune(self, aggregate, *args, **kwargs)

    monkeypatch.setattr(CoTuningServer, "co_tune", recording)
    common = [
        "rounds=1",
        "eval.limit=4",
        "privacy.clip_norm=0.05",
        'privacy.noise_source="seeded"',
        "federation.secure_aggregation=true",
        "federation.min_clients=2",
        'lora.variant="ffa"',
    ]
    for noise in ("0.0", "2.0"):
        overrides = [*common, f"privacy.noise_multiplier={noise}"]
        config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
        rows = simulate(config, tmp_path / noise)
    assert rows[1]["secure_aggregation"] and "epsilon" in rows[1]
    assert all("lora_B" in k for k in aggregates[0])  # FFA: theta is the B matrices alone
    difference = torch.cat([(aggregates[1][k] - aggregates[0][k]).ravel() for k in aggregates[0]])
    # Three shares of std sigma C / sqrt(2) each, summed and divided by 3.
    expected = 2.0 * 0.05 * math.sqrt(3 / 2) / 3
    assert difference.std().item() == pytest.approx(expected, rel=0.1)


@pytest.mark.slow
def test_ffa_lora_sends_only_b_and_keeps_a_at_its_init(tmp_path, data_dir):
    """In the in-process reference (what the Flower run gives, bit for bit)."""
    config = load_config(
        TINY, data_dir=str(data_dir), overrides=["rounds=1", "eval.limit=4", 'lora.variant="ffa"']
    )
    server = CoTuningServer.from_config(config)
    (result,) = reference_rounds(config, server)
    plain = load_config(TINY, data_dir=str(data_dir))
    full = CoTuningServer.from_config(plain).slm_adapter
    assert adapter_numel(result.slm_adapter) * 2 == sum(v.numel() for v in full.values())
    assert "lora_aggregation_error" not in result.measured  # exact by construction
    from safetensors.torch import load_file

    server.save_adapters(tmp_path)
    saved = load_file(tmp_path / "adapters" / "slm" / "adapter_model.safetensors")
    for key, value in full.items():
        if "lora_A" in key:
            assert torch.equal(saved[key], value)  # A never moved
        else:
            assert not torch.equal(saved[key], value)  # B trained


def test_dp_noise_under_secagg_needs_a_clipping_range_that_holds_it():
    """sigma 2, C 0.5, two clients: each share has std 0.71, so values reach about 5.4; with
    the default range of 1 every client refused to send, and the run had no updates."""
    secure = ["federation.secure_aggregation=true", "federation.min_clients=2"]
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides=[*DP, *secure])
    assert str(err.value) == (
        "federation.secagg_clipping_range = 1 is below what a client's noised update reaches "
        "(about 5.4: clip_norm 0.5 + 7 x its noise share's std 0.71); set it to 6 or more on "
        "every party"
    )
    load_config(TINY, overrides=[*DP, *secure, "federation.secagg_clipping_range=6"])


def test_under_secure_aggregation_the_server_adds_no_noise_and_clips_nothing(data_dir):
    """The clients' noise shares are the noise: the in-process reference of a secure round
    must neither add the server's nor clip the noised updates (which would cut the noise)."""
    secure = ["federation.secure_aggregation=true", "federation.min_clients=2"]
    overrides = [*DP, *secure, "federation.secagg_clipping_range=6"]
    server = CoTuningServer.from_config(
        load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    )
    broadcast = server.slm_adapter
    far = [ClientUpdate({k: v + 1.0 for k, v in broadcast.items()}, 50, 1.0, 4) for _ in "ab"]
    aggregate = server.aggregate(far, broadcast, 1)
    assert all(torch.allclose(aggregate[k], broadcast[k] + 1.0) for k in broadcast)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ([*DP, "eval.clients=true"], "the clients' own scores are among what it withholds"),
        (['client.aggregation="fednova"'], "weighs by the sizes or steps it withholds"),
    ],
)
def test_withheld_metrics_refuse_what_would_need_them(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(TINY, overrides=["privacy.withhold_metrics=true", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_withheld_metrics_leave_only_the_partition_and_the_bytes_in_a_reply(
    tmp_path, data_dir, monkeypatch, secure
):
    """Under DP the training loss, size, steps and timings of a client are outside the
    guarantee (docs/PRIVACY.md): with privacy.withhold_metrics no reply carries them."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    pulled = []
    pull = InMemoryGrid.pull_messages

    def recording(self, message_ids):
        replies = list(pull(self, message_ids))
        pulled.extend(replies)
        return replies

    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording)
    overrides = [
        "privacy.clip_norm=0.05",
        "privacy.noise_multiplier=0.5",
        "privacy.withhold_metrics=true",
        "rounds=1",
        "eval.limit=4",
    ]
    if secure:
        overrides += ["federation.secure_aggregation=true", "federation.min_clients=2"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    row = simulate(config, tmp_path / "run")[1]
    assert len(row["clients"]) == 3 and all(c.get("train_loss") is None for c in row["clients"])
    for client in row["clients"]:
        assert not {"num_examples", "steps", "seconds", "clock_seconds"} & {
            k for k, v in client.items() if v
        }
    said = set()
    for reply in pulled:
        for name in ("metrics",):
            if name in reply.content.metric_records:
                said |= set(reply.content.metric_records[name])
    if not secure:
        assert said == {"partition", "bytes_received"}
    assert "train_loss" not in json.dumps([c for c in row["clients"] if c.get("train_loss")])
