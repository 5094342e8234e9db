"""The model and data plumbing every layer uses: batches, parameter choice, eval mode."""
import pytest
import torch
from torch import nn

from landscape_kernels.capture.model import as_batches, chosen_parameters, eval_mode


def test_batches_from_a_pair_or_an_iterable():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert [b[0].shape[0] for b in as_batches((x, y), 4)] == [4, 4, 2]
    assert len(as_batches((x, y))) == 1
    assert [b[0].shape[0] for b in as_batches([(x[:3], y[:3]), (x[3:3], y[3:3]), (x[3:], y[3:])])] == [3, 7]
    with pytest.raises(ValueError, match="differ in length: 10 and 9"):
        as_batches((x, y[:9]))
    with pytest.raises(ValueError, match="no samples"):
        as_batches([(x[:0], y[:0])])


def test_chosen_parameters_are_checked():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    assert chosen_parameters(model, None)[0] == ["0.weight", "2.weight", "2.bias"]
    assert chosen_parameters(model, ["2.bias", "0.weight"])[0] == ["2.bias", "0.weight"]
    with pytest.raises(ValueError, match=r"\['1.weight'\] are not parameters"):
        chosen_parameters(model, ["1.weight"])
    with pytest.raises(ValueError, match="more than once"):
        chosen_parameters(model, ["0.weight", "0.weight"])


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_when_the_body_fails(training):
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training == training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training == training and model[1].training == training
