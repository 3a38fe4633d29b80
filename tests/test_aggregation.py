"""Step 3: aggregation arithmetic on known arrays."""

import pytest
import torch

from fedcollm.algorithm.aggregation import client_weights, weighted_mean


def test_uniform_mean_of_known_arrays():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[3.0]])}
    c = {"w": torch.tensor([5.0, 1.0]), "b": torch.tensor([[6.0]])}
    mean = weighted_mean([a, b, c], client_weights([10, 20, 70], "uniform"))
    assert torch.allclose(mean["w"], torch.tensor([3.0, 3.0]))
    assert torch.allclose(mean["b"], torch.tensor([[3.0]]))
    assert mean["w"].dtype == torch.float32


def test_weighting_by_example_count():
    assert client_weights([1, 3], "num_examples") == [0.25, 0.75]
    a, b = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([4.0, 0.0])}
    mean = weighted_mean([a, b], client_weights([1, 3], "num_examples"))
    assert torch.allclose(mean["w"], torch.tensor([3.0, 1.0]))


def test_float16_inputs_are_accumulated_in_high_precision():
    adapters = [{"w": torch.full((3,), 1 + 2**-10, dtype=torch.float16)} for _ in range(8)]
    mean = weighted_mean(adapters, client_weights([1] * 8, "uniform"))
    assert mean["w"][0].item() == pytest.approx(1 + 2**-10, abs=1e-7)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no client adapters"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="aggregation must be"):
        client_weights([1], "median")
