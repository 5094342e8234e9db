"""The papers' networks: shapes, parameter names, seeded initialisation."""
import pytest
import torch
from torch import nn

from landscape_kernels.training.models import mlp, simple_cnn


def test_reference_mlp_is_spec_1_1():
    model = mlp()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {"0.weight": (50, 784), "2.weight": (50, 50), "4.weight": (10, 50)}  # no biases; W2 = 2.weight
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert mlp((64, 20, 10), bias=True, activation="tanh")(torch.zeros(3, 64)).shape == (3, 10)


def test_seeded_initialisation_is_reproducible_and_leaves_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = mlp(seed=3), mlp(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(mlp(seed=4)[0].weight, a[0].weight)
    bound = 1 / 784 ** 0.5  # PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for these weights
    top = float(a[0].weight.detach().abs().max())
    assert 0.9 * bound < top <= bound


def test_simple_cnn_is_spec_2_3():
    model = simple_cnn(seed=0)
    assert sum(p.numel() for p in model.parameters()) == 197482
    assert model(torch.zeros(2, 784)).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [({"widths": (784,)}, "at least an input and an output"),
                                          ({"activation": "gelu"}, "activation must be one of")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp(**kwargs)
