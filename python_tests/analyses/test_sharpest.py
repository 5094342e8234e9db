"""Jastrzębski et al. 2019 decomposed step and cross-sections on linear least squares, where the loss is exactly
quadratic: every loss change has a closed form in the gradient and the Hessian."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.analyses.sharpest import GAMMAS, cross_sections, decomposed_step
from landscape_kernels.training.sharpness import minibatch_gradients


def _least_squares(N=203, d=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
    H = 2 * x.T @ x / N  # Hessian of mean((x w - y)^2)
    g = H @ model.weight.detach().reshape(-1) - 2 * x.T @ y.reshape(-1) / N
    return model, x, y, H, g


def _quadratic_change(g, H, d, delta):
    return delta * (g @ d) + 0.5 * delta**2 * (d @ H @ d)


def test_decomposed_step_matches_the_quadratic_closed_form():
    model, x, y, H, g = _least_squares()
    evals, evecs = torch.linalg.eigh(H)
    E = evecs[:, [-1, -2, -3]]  # top three
    grads = minibatch_gradients(model, F.mse_loss, x, y, batch_size=17, count=5, seed=1)
    lr = 1.0 / float(evals[-1])  # lr * lambda_1 = 1
    res = decomposed_step(model, F.mse_loss, (x, y), E, grads, lr, batch_size=50, seed=2)
    assert res.labels == ["e_1", "e_2", "e_3", "random", "full step"] and res.gammas == list(GAMMAS)
    assert res.changes.shape == (5, 5, len(GAMMAS))
    assert res.loss0 == pytest.approx(float(F.mse_loss(model(x), y).detach()), rel=1e-12)
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(7, generator=gen, dtype=torch.float64)
    r = r / r.norm()
    for b in range(5):
        gB = grads[:, b]
        dirs = [E[:, 0], E[:, 1], E[:, 2], r]
        for row, d in enumerate(dirs):
            for j, gamma in enumerate(GAMMAS):
                want = _quadratic_change(g, H, d, -gamma * lr * float(gB @ d))
                assert float(res.changes[row, b, j]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
        u = gB / gB.norm()
        for j, gamma in enumerate(GAMMAS):
            want = _quadratic_change(g, H, u, -gamma * lr * float(gB.norm()))
            assert float(res.changes[4, b, j]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    # the minibatch gradients are the gradients of the drawn minibatches (mean loss)
    assert torch.allclose(grads.mean(1), g, atol=3.0 * float(grads.std(1).max()))
    summary = res.to_dict()
    assert len(summary["mean_changes"]) == 5 and len(summary["mean_abs_projection"]) == 5


def test_decomposed_step_along_e1_stops_decreasing_at_lr_lambda_2():
    """With the full-batch gradient as 'minibatch' and lr lambda_1 = 2, the gamma = 1 step along e_1
    leaves the loss unchanged and gamma = 0.5 lowers it: the mechanism of Jastrzębski et al. 2019's finding."""
    model, x, y, H, g = _least_squares(seed=3)
    evals, evecs = torch.linalg.eigh(H)
    lr = 2.0 / float(evals[-1])
    res = decomposed_step(model, F.mse_loss, (x, y), evecs[:, -1:], g[:, None], lr, gammas=(0.5, 1.0, 2.0))
    half, one, two = res.changes[0, 0].tolist()
    assert half < 0 and abs(one) < 1e-10 * res.loss0 and two > 0


def test_cross_sections_are_the_loss_along_each_direction():
    model, x, y, H, g = _least_squares(seed=4)
    _, evecs = torch.linalg.eigh(H)
    E = evecs[:, [-1, 0]]
    s = [0.3, 0.05]
    cs = cross_sections(model, F.mse_loss, (x, y), E, s, epsilons=(-2.0, 0.0, 1.0, 16.0))
    w0 = model.weight.detach().reshape(-1)
    for i in range(2):
        for j, eps in enumerate(cs.epsilons):
            w = w0 + eps * s[i] * E[:, i]
            assert float(cs.losses[i, j]) == pytest.approx(float(((x @ w - y[:, 0]) ** 2).mean()), rel=1e-12)
    assert torch.equal(model.weight.detach().reshape(-1), w0)  # the model is not moved
    assert cs.to_dict()["step_lengths"] == s


def test_bad_input_names_the_argument():
    model, x, y, H, g = _least_squares()
    with pytest.raises(ValueError, match="E must be"):
        decomposed_step(model, F.mse_loss, (x, y), torch.zeros(5, 2), g[:, None], 0.1)
    with pytest.raises(ValueError, match="gradients must be"):
        decomposed_step(model, F.mse_loss, (x, y), torch.eye(7)[:, :1].double(), g[:4, None], 0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        decomposed_step(model, F.mse_loss, (x, y), torch.eye(7)[:, :1].double(), g[:, None], 0.0)
    with pytest.raises(ValueError, match="step_lengths"):
        cross_sections(model, F.mse_loss, (x, y), torch.eye(7)[:, :2].double(), [0.1])
    with pytest.raises(ValueError, match="NaN"):
        cross_sections(model, F.mse_loss, (x, y), torch.full((7, 1), float("nan"), dtype=torch.float64), [0.1])
    with pytest.raises(ValueError, match="batch_size must be in"):
        minibatch_gradients(model, F.mse_loss, x, y, batch_size=0, count=2)
