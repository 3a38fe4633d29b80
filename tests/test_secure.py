"""Secure aggregation with Flower's SecAgg+: the same aggregate as plain averaging, and the
server never holds one client's adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedcollm.algorithm.round import in_process_clients, sampled_partitions, transmitted
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import ConfigError, load_config
from fedcollm.federation import masks
from fedcollm.federation.client_app import train
from fedcollm.federation.secure_client import (
    check_within_clipping,
    secure_weight,
    secure_when_asked,
)
from fedcollm.federation.secure_server import SecureFedCoLLM
from fedcollm.federation.simulation import simulate

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
SECURE = ["federation.secure_aggregation=true", "federation.min_clients=2", "eval.limit=4"]
# SecAgg+ quantises each value in [-1, 1] on 2**22 levels with stochastic rounding: the mean
# of K clients is off by at most one step, 2 / 2**22 = 4.8e-7, per value.
TOLERANCE = 2 / 2**22


def test_secure_aggregation_needs_fp32_and_two_clients():
    with pytest.raises(ConfigError, match="adapter_dtype"):
        load_config(TINY, overrides=[*SECURE, 'federation.adapter_dtype="float16"'])
    with pytest.raises(ConfigError, match="at least 2 with secure_aggregation"):
        load_config(TINY, overrides=[*SECURE, "federation.min_clients=1"])


def test_clients_refuse_to_send_what_secagg_would_clip_or_corrupt():
    check_within_clipping({"a": torch.full((2,), 0.99)}, 1.0)
    with pytest.raises(ValueError, match="beyond federation.secagg_clipping_range = 1"):
        check_within_clipping({"a": torch.tensor([0.1, -1.5])}, 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_within_clipping({"a": torch.tensor([float("nan")])}, 1.0)


def _recording(monkeypatch) -> dict[str, list]:
    """Record every aggregate handed to distillation and every reply the server pulls."""
    seen: dict[str, list] = {"aggregates": [], "replies": [], "fit_results": []}
    co_tune, pull = CoTuningServer.co_tune, InMemoryGrid.pull_messages
    aggregate_fit = SecureFedCoLLM.aggregate_fit

    def recording_co_tune(self, aggregate, *args, **kwargs):
        seen["aggregates"].append({k: v.clone() for k, v in aggregate.items()})
        return co_tune(self, aggregate, *args, **kwargs)

    def recording_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        seen["replies"].extend(replies)
        return replies

    def recording_aggregate_fit(self, server_round, results, failures):
        seen["fit_results"].append(results)
        return aggregate_fit(self, server_round, results, failures)

    monkeypatch.setattr(CoTuningServer, "co_tune", recording_co_tune)
    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)
    monkeypatch.setattr(SecureFedCoLLM, "aggregate_fit", recording_aggregate_fit)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["uniform", "num_examples"])
def test_the_secure_aggregate_equals_plain_aggregation(
    tmp_path, data_dir, monkeypatch, aggregation
):
    # A Dirichlet split gives the clients unequal |D_k|, so weighting by it matters.
    unequal = [
        "rounds=1",
        "eval.limit=4",
        'data.partition="dirichlet"',
        f'client.aggregation="{aggregation}"',
    ]
    seen = _recording(monkeypatch)
    plain = load_config(TINY, data_dir=str(data_dir), overrides=unequal)
    plain_aggregate = reference_aggregate(plain, [0, 1, 2])
    secure = load_config(TINY, data_dir=str(data_dir), overrides=[*unequal, *SECURE])
    rows = simulate(secure, tmp_path / "secure")

    sizes = [c["num_examples"] for c in rows[1]["clients"]]
    assert len(set(sizes)) == len(sizes), sizes
    # Each client's value is off by at most one quantisation step before the sum is divided
    # by the sum of the weights, each |D_k| / max |D_k| (or 1 each for a uniform mean).
    weights = [n / max(sizes) for n in sizes] if aggregation == "num_examples" else [1] * 3
    tolerance = len(sizes) * TOLERANCE / sum(weights)
    (secure_aggregate,) = seen["aggregates"]
    assert plain_aggregate.keys() == secure_aggregate.keys()
    errors = [
        (plain_aggregate[k] - secure_aggregate[k]).abs().max().item() for k in plain_aggregate
    ]
    assert 0 < max(errors) <= tolerance  # not bit-equal: it went through quantisation
    assert rows[1]["secure_aggregation"] and len(rows[1]["clients"]) == secure.num_clients
    assert rows[1]["dropped"] == []

    # The secure server sees only integers masked modulo 2**32 (the plain one every client's
    # fp32 adapter: test_federation), and the strategy gets the one mean K times, never a
    # single update.
    masked = []
    for reply in seen["replies"]:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        masked += [bytes_to_ndarray(b) for b in configs.get(Key.MASKED_PARAMETERS, [])]
    assert len(masked) >= secure.num_clients * len(plain_aggregate)
    assert {a.dtype.kind for a in masked} <= set("iu")
    (results,) = seen["fit_results"]
    vectors = {
        tuple(np.concatenate([a.ravel() for a in _arrays(res)]).tolist()) for _, res in results
    }
    assert len(results) == secure.num_clients and len(vectors) == 1


def test_a_client_refuses_a_weight_above_the_bound_the_server_announced():
    config = load_config(TINY, overrides=['client.aggregation="num_examples"'])
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert secure_weight(80, config, context) == 80  # no SecAgg+ setup seen: nothing to check
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"max_weight": 50.0})
    assert secure_weight(50, config, context) == 50
    with pytest.raises(ValueError, match="exceeds the SecAgg\\+ max_weight 50.*secagg_max_weight"):
        secure_weight(51, config, context)
    uniform = load_config(TINY)
    assert secure_weight(51, uniform, context) == 1


def test_a_secagg_weight_bound_below_the_largest_client_is_refused_before_the_run(data_dir):
    from fedcollm.preflight import check_data

    secure = ["federation.secure_aggregation=true", "federation.min_clients=2"]
    sets = [*secure, 'client.aggregation="num_examples"']
    config = load_config(TINY, data_dir=str(data_dir), overrides=sets)
    largest = max(len(part) for part in check_data(config).clients)
    for bound, refused in ((1, True), (largest - 1, True), (largest, False), (0, False)):
        config.federation.secagg_max_weight = bound
        if refused:
            with pytest.raises(ConfigError, match=f"secagg_max_weight = {bound} is below"):
                check_data(config)
        else:
            check_data(config)
    uniform = load_config(TINY, data_dir=str(data_dir), overrides=secure)
    uniform.federation.secagg_max_weight = 1  # every weight is 1
    check_data(uniform)


def reference_aggregate(config, partitions: list[int]):
    """Round 1's plain aggregate of these partitions' updates, in this process: what the
    plain Flower run gives, bit for bit (test_federation's reference test)."""
    server, clients = CoTuningServer.from_config(config), in_process_clients(config)
    theta = transmitted(server.slm_adapter, config.federation.adapter_dtype)
    return server.aggregate([clients[k].update(theta, 1) for k in partitions], theta, 1)


def _arrays(fit_res):
    return parameters_to_ndarrays(fit_res.parameters)


def _failing_app(config, partition: int) -> ClientApp:
    """The ClientApp of `config` whose client `partition` fails while it trains: under
    SecAgg+ that is after it shared its keys, so the server must rebuild its masks."""
    app = ClientApp(mods=[secure_when_asked])

    @app.train()
    def _train(msg, context):
        if int(context.node_config["partition-id"]) == partition:
            raise RuntimeError("disk full")
        return train(config, msg, context)

    return app


@pytest.mark.slow
def test_a_secure_round_without_a_failed_client_is_the_mean_of_the_others(
    tmp_path, data_dir, monkeypatch
):
    seen = _recording(monkeypatch)
    drawn = []
    uniform_integers = masks.uniform_integers

    def counted(key, modulus, shapes):
        drawn.append(len(shapes))
        return uniform_integers(key, modulus, shapes)

    monkeypatch.setattr(masks, "uniform_integers", counted)  # the server's draws
    plain = load_config(TINY, data_dir=str(data_dir), overrides=["rounds=1", "eval.limit=4"])
    plain_aggregate = reference_aggregate(plain, [0, 2])  # client 1 failed
    config = load_config(TINY, data_dir=str(data_dir), overrides=["rounds=1", *SECURE])
    rows = simulate(config, tmp_path / "secure", client_app=_failing_app(config, 1))
    assert sorted(c["partition"] for c in rows[1]["clients"]) == [0, 2]
    assert rows[1]["dropped"] and "skipped" not in rows[1]
    assert rows[1]["distilled_sha256"] != rows[1]["broadcast_sha256"]
    # Unmasking drew the two survivors' own masks and the failed client's two pairwise masks
    # from ChaCha20; had the clients masked with anything else, nothing would cancel.
    assert len(drawn) == 4
    (secure_aggregate,) = seen["aggregates"]
    errors = [
        (plain_aggregate[k] - secure_aggregate[k]).abs().max().item() for k in plain_aggregate
    ]
    assert 0 < max(errors) <= TOLERANCE  # the mean of 2, each off by at most one step


@pytest.mark.slow
def test_a_secure_run_on_sampled_clients_resumes(tmp_path, data_dir):
    sampled = [*SECURE, "federation.clients_per_round=2"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=["rounds=1", *sampled])
    simulate(config, tmp_path)
    longer = load_config(TINY, data_dir=str(data_dir), overrides=["rounds=2", *sampled])
    rows = simulate(longer, tmp_path, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["broadcast_sha256"] == rows[1]["distilled_sha256"]
    for row in rows[1:]:  # SecAgg+ ran among the sampled nodes only
        assert row["secure_aggregation"] and "skipped" not in row
        expected = sampled_partitions(longer, row["round"])
        assert row["sampled_partitions"] == expected
        assert sorted(c["partition"] for c in row["clients"]) == expected
    assert rows[1]["sampled_partitions"] != rows[2]["sampled_partitions"]
