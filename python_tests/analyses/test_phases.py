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


def test_loss_separation_auc_against_pairwise_counting():
    from landscape_kernels.analyses.phases import loss_separation_auc

    g = torch.Generator().manual_seed(5)
    losses = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    wrong = torch.rand(40, generator=g) < 0.3
    lw, lc = losses[wrong], losses[~wrong]
    want = float(((lw[:, None] > lc[None]).double() + 0.5 * (lw[:, None] == lc[None]).double()).mean())
    assert loss_separation_auc(losses, wrong) == pytest.approx(want, rel=1e-12)
    assert loss_separation_auc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0


def test_clean_by_loss_precision_and_recall():
    from landscape_kernels.analyses.phases import clean_by_loss

    losses = torch.tensor([0.1, 5.0, 0.2, 4.0, 3.0, 0.3, 0.1, 0.2, 0.1, 0.2])
    wrong = torch.tensor([0, 1, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    c = clean_by_loss(losses, wrong, 0.3)  # removes 5.0, 4.0, 3.0: two of the three mislabels
    assert sorted(c.removed.tolist()) == [1, 3, 4]
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 3)


def test_phase_boundaries_of_known_curves():
    from landscape_kernels.analyses.phases import phase_boundaries

    t = torch.arange(200.0)
    clean = 0.05 + 0.85 * torch.exp(-t / 8)  # down, then flat: two phases
    p = phase_boundaries(clean)
    assert p.count == 2 and 15 <= p.starts[1] <= 25
    # down until 20, flat until 60, up until 100, plateau: four phases near those times
    e = torch.where(t < 20, 0.9 - 0.04 * t, torch.full_like(t, 0.1))
    e = torch.where((t >= 60) & (t < 100), 0.1 + 0.3 * (t - 60) / 40, e)
    e = torch.where(t >= 100, torch.full_like(t, 0.4), e)
    p = phase_boundaries(e)
    assert p.count == 4
    s1, s2, s3 = p.starts[1:]
    assert 17 <= s1 <= 21 and 58 <= s2 <= 66 and 94 <= s3 <= 100
    assert p.rise == pytest.approx(0.3, abs=1e-6)  # float32 curve
