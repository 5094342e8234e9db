"""The learning-phase order parameters from block sums of the per-sample Gram matrix, against explicit
minibatch and group gradients from autograd."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_kernels.analyses.phases import (
    disjoint_minibatches, ensemble_order, group_order, minibatch_gram, per_sample_gram)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 4)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 7, generator=g, dtype=torch.float64), torch.randint(0, 4, (60,), generator=g)
    return model, x, y


def _gradient(model, x, y):
    model.eval()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def test_ensemble_order_equals_explicit_minibatch_gradients():
    model, x, y = _problem()
    batches = disjoint_minibatches(60, 7, 5, seed=2)
    gram = per_sample_gram(model, F.cross_entropy, x, y)
    assert model.training  # put back as it was
    grads = torch.stack([_gradient(model, x[b], y[b]) for b in batches])
    torch.testing.assert_close(minibatch_gram(gram, batches), grads @ grads.T, rtol=1e-10, atol=1e-14)
    got = ensemble_order(gram, batches)
    unit = grads / grads.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    assert got.alignment == pytest.approx(float(cos[~torch.eye(5, dtype=torch.bool)].mean()), rel=1e-10)
    assert got.amplitude == pytest.approx(float(grads.norm(dim=1).mean()), rel=1e-10)
    assert (got.num_batches, got.batch_size) == (5, 7)


def test_group_order_equals_explicit_group_gradients():
    model, x, y = _problem()
    wrong = torch.zeros(60, dtype=torch.bool)
    wrong[::4] = True
    gram = per_sample_gram(model, F.cross_entropy, x, y)
    gc, gw = _gradient(model, x[~wrong], y[~wrong]), _gradient(model, x[wrong], y[wrong])
    got = group_order(gram, wrong)
    assert got.cosine == pytest.approx(float(gc @ gw / (gc.norm() * gw.norm())), rel=1e-10)
    assert got.norm_correct == pytest.approx(float(gc.norm()), rel=1e-10)
    assert got.strength == pytest.approx(float(15 * gw.norm() / (45 * gc.norm())), rel=1e-10)
    # the two shares add up to the full gradient
    full = _gradient(model, x, y)
    torch.testing.assert_close(full, (45 * gc + 15 * gw) / 60, rtol=1e-10, atol=1e-14)


def test_bad_inputs_are_named():
    gram = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="need 12 samples; there are 6"):
        disjoint_minibatches(6, 4, 3)
    with pytest.raises(ValueError, match="at least 2 minibatches"):
        ensemble_order(gram, torch.arange(3)[None])
    with pytest.raises(ValueError, match="needs correctly and wrongly labelled samples, got 6 and 0"):
        group_order(gram, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask of the 6 samples"):
        group_order(gram, torch.zeros(5, dtype=torch.bool))
