"""SharpnessTracker (Jastrzębski et al. 2019) on problems with known Hessians, warm starts, and inside training."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.training.models import mlp
from landscape_kernels.training.optim import NSGD
from landscape_kernels.training.sharpness import DenseEarly, SharpnessTracker, fixed_subset
from landscape_kernels.training.trainer import SGDTrainer


def regression(n=300, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, d, dtype=torch.float64)
    t = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    return model, X, t


def test_linear_regression_eigenpairs_frobenius_and_alignment_match_the_closed_form():
    model, X, t = regression()
    tracker = SharpnessTracker(model, F.mse_loss, (X, t), k=3, batch_size=64, tol=1e-10, frobenius_probes=400,
                               alignment_batches=6)
    rec = tracker.measure()
    H = 2 * X.T @ X / X.shape[0]  # Hessian of the mean squared error of a linear model
    lam, U = torch.linalg.eigh(H)
    assert torch.allclose(torch.tensor(rec["eigenvalues"], dtype=torch.float64), lam.flip(0)[:3], rtol=1e-9)
    assert max(rec["residuals"]) < 1e-8 * float(lam[-1])
    fro = float(H.norm())
    assert abs(rec["frobenius"] - fro) < 4 * rec["frobenius_stderr"] and rec["frobenius_released"] > 0
    w = model.weight.detach().reshape(-1)
    g = 2 * X.T @ (X @ w[:, None] - t).reshape(-1) / X.shape[0]
    want = (U[:, -3:].flip(1).T @ g / g.norm()).abs()
    assert torch.allclose(torch.tensor(rec["cos_full_e"], dtype=torch.float64).abs(), want, atol=1e-8)
    assert math.isclose(rec["gradient_norm"], float(g.norm()), rel_tol=1e-10)
    assert all(0 <= s <= 1 for s in [rec["step_share_topk"]]) and len(rec["cos_minibatch_e"]) == 3
    assert rec["distance_from_init"] == 0 and rec["lr_lambda1"] is None


def test_warm_start_reaches_the_same_pairs_with_fewer_products():
    x = torch.randn(400, 10, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = mlp((10, 24, 3), seed=0).double()
    x = x.double()
    cold = SharpnessTracker(model, F.cross_entropy, (x, y), k=4, tol=1e-6, warm_start=False,
                            frobenius_probes=0, alignment_batches=0)
    warm = SharpnessTracker(model, F.cross_entropy, (x, y), k=4, tol=1e-6, frobenius_probes=0, alignment_batches=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(4):
        c, w = cold.measure(), warm.measure()
        assert torch.allclose(torch.tensor(c["eigenvalues"]), torch.tensor(w["eigenvalues"]), rtol=1e-4)
        if i > 0:
            assert w["warm_start"] and w["products"] < c["products"]
        for _ in range(3):  # move the weights a little
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert warm.version == 4 and warm.vectors.shape == (sum(p.numel() for p in model.parameters()), 4)


def test_tracker_in_training_logs_every_epoch_and_drives_nsgd(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, :3].argmax(1))
    model = mlp((6, 16, 3), seed=0)
    sub = fixed_subset(x, y, n=120, seed=0)
    tracker = SharpnessTracker(model, F.cross_entropy, sub, k=2, batch_size=50, frobenius_probes=8,
                               alignment_batches=4)
    opt = NSGD(model.parameters(), lr=0.1, gamma=0.5, refresh=tracker)
    trainer = SGDTrainer(model, x, y, batch_size=20, callbacks=[tracker], optimizer=opt,
                         checkpoint=tmp_path / "c.pt")
    trainer.run(max_epochs=3, stopping_rule=None)
    assert [r["step"] for r in tracker.history] == [0, 10, 20] and [r["epoch"] for r in tracker.history] == [0, 1, 2]
    for r in tracker.history:
        assert math.isclose(r["lr_lambda1"], 0.1 * r["eigenvalues"][0]) and r["eigenvalues"][0] >= r["eigenvalues"][1]
    assert tracker.history[-1]["distance_from_init"] > 0 and opt.E is not None
    assert torch.equal(opt.E, tracker.vectors)
    # the checkpoint holds the tracker's history: a resumed trainer continues it
    again = SharpnessTracker(mlp((6, 16, 3), seed=0), F.cross_entropy, sub, k=2)
    SGDTrainer(mlp((6, 16, 3), seed=0), x, y, batch_size=20, callbacks=[again], checkpoint=tmp_path / "c.pt",
               optimizer=NSGD(model.parameters(), lr=0.1, gamma=0.5)).resume()
    assert len(again.history) == 3 and again.version == 3


def test_bad_input():
    model, X, t = regression()
    with pytest.raises(ValueError, match="k must be a positive int"):
        SharpnessTracker(model, F.mse_loss, (X, t), k=0)
    with pytest.raises(ValueError, match="k = 20 exceeds the 12 chosen parameters"):
        SharpnessTracker(model, F.mse_loss, (X, t), k=20)
    with pytest.raises(ValueError, match="every must be None"):
        SharpnessTracker(model, F.mse_loss, (X, t), every=0)
    with pytest.raises(ValueError, match="frobenius_probes must be 0 or an int >= 2"):
        SharpnessTracker(model, F.mse_loss, (X, t), frobenius_probes=1)
    with pytest.raises(ValueError, match="no samples"):
        SharpnessTracker(model, F.mse_loss, (X[:0], t[:0]))
    with pytest.raises(ValueError, match="not parameters of the model"):
        SharpnessTracker(model, F.mse_loss, (X, t), params=["fc.weight"])
    with pytest.raises(ValueError, match="n must be in"):
        fixed_subset(X, t, n=0)


def test_dense_early_schedule_measures_often_in_the_first_epoch_then_per_epoch():
    x = torch.randn(100, 6)
    y = (x[:, 0] > 0).long()
    model = mlp((6, 8, 2), seed=0)
    tracker = SharpnessTracker(model, F.cross_entropy, (x, y), k=2, every=DenseEarly(3), frobenius_probes=0,
                               alignment_batches=0)
    trainer = SGDTrainer(model, x, y, batch_size=10, lr=0.1, callbacks=[tracker])
    trainer.run(max_epochs=3, stopping_rule=None)
    assert [r["step"] for r in tracker.history] == [0, 3, 6, 9, 10, 20]
    with pytest.raises(ValueError, match="every must be a positive int"):
        DenseEarly(0)
    with pytest.raises(ValueError, match="schedule"):
        SharpnessTracker(model, F.cross_entropy, (x, y), k=2, every=0.5)
