"""Heterogeneous LoRA ranks (issue 28 §2): a client trains theta's leading slices, each
slice is averaged over its holders (plainly and under secure aggregation), FlexLoRA's mean
product is refactorised by SVD; each against a dense reference written out here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcollm.algorithm.aggregation import aggregation_rule, weighted_mean
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.ranks import (
    flexlora,
    held,
    holder_share,
    pad,
    per_slice_mean,
    product_error,
    truncate,
)
from fedcollm.algorithm.round import in_process_clients, reference_rounds
from fedcollm.config import ConfigError, load_config
from fedcollm.federation.simulation import simulate
from fedcollm.models import adapter_digest, get_adapter

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
RANKS = "client.profiles=[{clients=[0], lora_r=2}, {clients=[1], lora_r=4}]"  # client 2: r 8
R_MAX = 8


def _adapters(ranks, seed=0):
    """theta and one padded adapter per client: its own slices below its rank, theta's above."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    theta = {"m.lora_A.weight": draw(R_MAX, 6), "m.lora_B.weight": draw(5, R_MAX)}
    clients = [pad({k: draw(*v.shape) for k, v in theta.items()}, theta, r) for r in ranks]
    return theta, clients


def _dense_slice_mean(theta, clients, ranks, weights):
    """Slice by slice: the weighted mean over the clients of rank above it."""
    out = {k: v.clone().double() for k, v in theta.items()}
    for j in range(R_MAX):
        holders = [(w, c) for w, c, r in zip(weights, clients, ranks, strict=True) if r > j]
        total = sum(w for w, _ in holders)
        out["m.lora_A.weight"][j] = (
            sum(w * c["m.lora_A.weight"][j].double() for w, c in holders) / total
        )
        out["m.lora_B.weight"][:, j] = (
            sum(w * c["m.lora_B.weight"][:, j].double() for w, c in holders) / total
        )
    return out


@pytest.mark.parametrize("aggregation", ["uniform", "num_examples"])
def test_each_slice_is_the_mean_of_its_holders(aggregation):
    ranks, sizes = [2, 4, 8], [10, 30, 20]
    theta, clients = _adapters(ranks)
    rule = aggregation_rule(aggregation)
    weights = rule.weights(sizes)
    updates = [
        ClientUpdate(c, n, 0.0, 4, rank=r) for c, n, r in zip(clients, sizes, ranks, strict=True)
    ]
    mean = rule.aggregate(updates, theta)
    got = per_slice_mean(mean, theta, holder_share(ranks, weights, R_MAX))
    expected = _dense_slice_mean(theta, clients, ranks, weights)
    for key in theta:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=0, atol=1e-5)
    # Under secure aggregation the server gets only the weighted mean of the uploads and of
    # each client's per-slice count: the same theta.
    share = weighted_mean([{"h": held(r, R_MAX)} for r in ranks], weights)["h"]
    secure = per_slice_mean(weighted_mean(clients, weights), theta, share.double())
    for key in theta:
        torch.testing.assert_close(secure[key].double(), expected[key], rtol=0, atol=1e-5)
    # Without the per-slice division the low slices would be pulled toward theta.
    assert (mean["m.lora_A.weight"][5] - expected["m.lora_A.weight"][5]).abs().max() > 1e-2


def test_flexlora_is_the_mean_product_refactorised_and_each_client_its_best_rank_r_part():
    ranks, weights = [2, 2, 3], [0.5, 0.25, 0.25]
    theta, clients = _adapters(ranks, seed=1)
    aggregate = flexlora(clients, weights, ranks, R_MAX)
    product = sum(
        w * (c["m.lora_B.weight"][:, :r].double() @ c["m.lora_A.weight"][:r].double())
        for w, c, r in zip(weights, clients, ranks, strict=True)
    )
    # The mean of products of ranks 2, 2, 3 has rank <= 7 < r_max = 8: nothing is lost.
    rebuilt = aggregate["m.lora_B.weight"].double() @ aggregate["m.lora_A.weight"].double()
    torch.testing.assert_close(rebuilt, product, rtol=0, atol=1e-5)
    assert product_error(clients, weights, ranks, aggregate) < 1e-6
    # A rank-2 client takes the leading slices: the best rank-2 approximation (Eckart-Young).
    mine = truncate(aggregate, 2)
    u, s, vh = torch.linalg.svd(product)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(
        mine["m.lora_B.weight"].double() @ mine["m.lora_A.weight"].double(), best, rtol=0, atol=1e-5
    )
    # Averaging A and B apart does lose something on the same clients.
    assert product_error(clients, weights, ranks, weighted_mean(clients, weights)) > 0.1


def test_a_client_trains_only_its_leading_slices_and_sends_theta_beyond_them(data_dir):
    config = load_config(TINY, data_dir=str(data_dir), overrides=[RANKS])
    low, _, full = in_process_clients(config)
    theta = {k: v + 0.01 for k, v in get_adapter(low.slm).items()}  # no zero B anywhere
    update = low.update(theta, 1)
    assert update.rank == 2
    for key, value in update.adapter.items():
        dim = 0 if "lora_A" in key else 1
        lead, rest = value.split([2, R_MAX - 2], dim=dim)
        theta_lead, theta_rest = theta[key].split([2, R_MAX - 2], dim=dim)
        assert torch.equal(rest, theta_rest)  # theta beyond its rank: a zero update there
        assert not torch.equal(lead, theta_lead)  # it trained its own slices
    # Its model held zeros beyond rank 2 the whole time: only the leading slices trained.
    assert all(
        not (v[2:] if "lora_A" in k else v[:, 2:]).any() for k, v in get_adapter(low.slm).items()
    )
    assert full.update(theta, 1).rank == R_MAX


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["client.profiles=[{clients=[0], lora_r=16}]"],
            "lora_r: 16 is not a rank up to lora.r = 8",
        ),
        (
            [RANKS, 'lora.variant="ffa"'],
            'lora_r below lora.r needs lora.variant = "lora"',
        ),
        (
            [
                'lora.rank_aggregation="flexlora"',
                "federation.secure_aggregation=true",
                "federation.min_clients=2",
            ],
            "needs every client's product B_k A_k, which secure aggregation hides",
        ),
    ],
)
def test_bad_ranks_are_refused_before_any_model_loads(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides=overrides)
    assert fragment in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slices", "flexlora"])
def test_a_run_with_three_ranks_is_the_reference_round(tmp_path, data_dir, mode):
    overrides = [RANKS, f'lora.rank_aggregation="{mode}"', "rounds=1", "eval.limit=4"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    row = simulate(config, tmp_path / "run")[1]
    (result,) = reference_rounds(config)
    assert adapter_digest(result.aggregate) == row["aggregate_sha256"]
    # Both lose something here (ranks 2 + 4 + 8 > 8: the mean product does not fit r_max);
    # the unit tests above check each against its dense reference.
    assert 0 < row["lora_aggregation_error"] < 1


@pytest.mark.slow
def test_three_ranks_under_secagg_give_the_plain_slice_mean(
    tmp_path, data_dir, distilled_aggregates
):
    base = [RANKS, "rounds=1", "eval.limit=4", 'data.partition="dirichlet"']
    secure = ["federation.secure_aggregation=true", "federation.min_clients=2"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=[*base, *secure])
    simulate(config, tmp_path / "secure")
    (secure_aggregate,) = distilled_aggregates  # before the reference adds its own
    (plain,) = reference_rounds(load_config(TINY, data_dir=str(data_dir), overrides=base))
    errors = [(plain.aggregate[k] - v).abs().max().item() for k, v in secure_aggregate.items()]
    # Quantisation of the uploads and of the counts, then divided by a share of 1/3 at least.
    assert 0 < max(errors) <= 3 * 3 * 2 / 2**22 * 4
