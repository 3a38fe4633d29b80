"""Step 3: aggregation rules, their arithmetic on known arrays, and the seam a new rule
plugs into (one registered class, nothing else)."""

from pathlib import Path

import pytest
import torch

from fedcollm.algorithm.aggregation import AggregationRule, aggregation_rule, weighted_mean
from fedcollm.algorithm.round import fedcollm_round, in_process_clients, transmitted
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import ConfigError, load_config
from fedcollm.registry import AGGREGATIONS

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def test_uniform_mean_of_known_arrays():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[3.0]])}
    c = {"w": torch.tensor([5.0, 1.0]), "b": torch.tensor([[6.0]])}
    rule = aggregation_rule("uniform")
    mean = rule.combine([a, b, c], rule.weights([10, 20, 70]))
    assert torch.allclose(mean["w"], torch.tensor([3.0, 3.0]))
    assert torch.allclose(mean["b"], torch.tensor([[3.0]]))
    assert mean["w"].dtype == torch.float32


def test_weighting_by_example_count():
    rule = aggregation_rule("num_examples")
    assert rule.weights([1, 3]) == [0.25, 0.75]
    a, b = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([4.0, 0.0])}
    mean = rule.combine([a, b], rule.weights([1, 3]))
    assert torch.allclose(mean["w"], torch.tensor([3.0, 1.0]))


def test_float16_inputs_are_accumulated_in_high_precision():
    adapters = [{"w": torch.full((3,), 1 + 2**-10, dtype=torch.float16)} for _ in range(8)]
    mean = weighted_mean(adapters, aggregation_rule("uniform").weights([1] * 8))
    assert mean["w"][0].item() == pytest.approx(1 + 2**-10, abs=1e-7)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no client adapters"):
        weighted_mean([], [])
    with pytest.raises(ConfigError, match="client.aggregation: 'median' is not allowed; choose"):
        load_config(TINY, overrides=['client.aggregation="median"'])


class Median(AggregationRule):
    """Flower's FedMedian: the coordinate-wise median, which SecAgg+ cannot compute."""

    secure = False

    def combine(self, adapters, weights):
        return {k: torch.stack([a[k] for a in adapters]).median(dim=0).values for k in adapters[0]}


@pytest.fixture
def median():
    AGGREGATIONS.register("median", Median)
    yield
    AGGREGATIONS.unregister("median")


def test_a_rule_registered_in_one_place_is_chosen_by_config_and_used_by_the_round(median, data_dir):
    overrides = ['client.aggregation="median"', "rounds=1", "eval.limit=4", "num_clients=3"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    with pytest.raises(ConfigError, match="'median' is not a weighted mean"):
        load_config(TINY, data_dir=str(data_dir), overrides=[*overrides, *SECURE])
    server, clients = CoTuningServer.from_config(config), in_process_clients(config)
    theta = server.slm_adapter
    result = fedcollm_round(server, clients, theta, server_round=1)
    # The clients' uploads again (their update is seeded by round and partition).
    uploads = [c.update(transmitted(theta, "float32"), 1).adapter for c in clients]
    for key, value in result.aggregate.items():
        expected = torch.stack([u[key] for u in uploads]).median(dim=0).values
        assert torch.equal(value, expected), key
        mean = torch.stack([u[key] for u in uploads]).mean(dim=0)
        assert not torch.allclose(value, mean)  # not the plain mean: the rule was used


SECURE = ["federation.secure_aggregation=true", "federation.min_clients=2"]
