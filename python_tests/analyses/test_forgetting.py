"""The forgetting analysis's building blocks: the LDC and EWC penalties, the diagonal Fisher, penalised SGD."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.analyses.forgetting import EWCPenalty, LDCPenalty
from landscape_kernels.training.trainer import SGDTrainer
from testing import small_mlp


def net():
    return small_mlp((4, 3, 3, 2), bias=(True, False, True), seed=0)


def test_ldc_penalties_have_their_closed_forms(gen):
    model = net()
    w1 = model[2].weight.detach().clone()
    P = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=gen))[0].T[:3]  # 3 unit directions
    Fw = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    q_true = torch.tensor([0.01, -0.3, 0.02], dtype=torch.float64)
    with torch.no_grad():
        model[2].weight += (q_true @ P).reshape(3, 3)
    quad = LDCPenalty("2.weight", w1, P, Fw, lam=10.0)
    hinge = LDCPenalty("2.weight", w1, P, Fw, lam=10.0, form="hinge")
    assert torch.allclose(quad.displacement(model), q_true, atol=1e-15)
    assert float(quad(model).detach()) == pytest.approx(10 * float(((q_true / Fw) ** 2).sum()), rel=1e-12)
    xi = 0.008 * Fw  # 0.004, 0.016, 0.08: only the first two are beyond their threshold
    want = 10 * ((0.01 - 0.004) ** 2 + (0.3 - 0.016) ** 2)
    assert float(hinge(model).detach()) == pytest.approx(want, rel=1e-12)
    assert torch.allclose(hinge.xi, xi)
    with pytest.raises(ValueError, match="form must be one of"):
        LDCPenalty("2.weight", w1, P, Fw, 1.0, form="cubic")
    with pytest.raises(ValueError, match="every flatness F_1i must be positive"):
        LDCPenalty("2.weight", w1, P, -Fw, 1.0)


def test_ewc_penalty_and_its_strongest_constraints(gen):
    model = net()
    fisher = {n: torch.rand(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    full = EWCPenalty(model, fisher, lam=4.0)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.1
    want = 0.5 * 4.0 * sum(float((f * 0.01).sum()) for f in fisher.values())
    assert float(full(model).detach()) == pytest.approx(want, rel=1e-12)
    top = EWCPenalty(model, fisher, lam=4.0, num_constraints=5)  # anchored at the moved weights
    with torch.no_grad():
        for p in model.parameters():
            p += 0.1
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    assert float(top(model).detach()) == pytest.approx(0.5 * 4.0 * float(torch.topk(flat, 5).values.sum()) * 0.01, rel=1e-12)
    with pytest.raises(ValueError, match="num_constraints must be in"):
        EWCPenalty(model, fisher, 1.0, num_constraints=0)


def test_penalised_full_batch_step_is_gradient_descent_on_loss_plus_penalty(gen):
    X, t = torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randn(12, 1, dtype=torch.float64, generator=gen)
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    w0 = model[0].weight.detach().clone()
    anchor = torch.zeros_like(w0)

    def penalty(m):
        return 0.7 * ((m[0].weight - anchor) ** 2).sum()

    trainer = SGDTrainer(model, X, t, batch_size=12, lr=0.05, loss_fn=F.mse_loss, penalty=penalty)
    trainer.run(max_epochs=1, stopping_rule=None)
    grad_loss = (2 / 12) * (X @ w0.T - t).T @ X
    assert torch.allclose(model[0].weight.detach(), w0 - 0.05 * (grad_loss + 1.4 * w0), rtol=1e-13)
    assert trainer.history[0]["train_loss"] == pytest.approx(float(F.mse_loss(X @ w0.T, t)), rel=1e-12)  # no penalty


def _prox_optimality(penalty, model, v, lr):
    """The proximal point u of v satisfies (u - v) / lr + grad penalty(u) = 0: the largest violation."""
    params = list(model.parameters())
    g = torch.autograd.grad(penalty(model), params, allow_unused=True)
    return max(float(((p.detach() - v0) / lr + (torch.zeros_like(p) if gi is None else gi)).abs().max())
               for p, v0, gi in zip(params, v, g))


@pytest.mark.parametrize("form", ["quadratic", "hinge"])
def test_ldc_prox_over_several_matrices_is_the_proximal_point(gen, form):
    model = net()
    names = ["0.weight", "2.weight"]
    w1 = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    P = torch.linalg.qr(torch.randn(21, 21, dtype=torch.float64, generator=gen))[0].T[:4]
    Fw = torch.tensor([0.05, 0.3, 2.0, 10.0], dtype=torch.float64)
    pen = LDCPenalty(names, w1, P, Fw, lam=1e4, form=form)
    with torch.no_grad():
        model[0].weight += 0.3 * torch.randn(3, 4, dtype=torch.float64, generator=gen)
        model[2].weight += 0.3 * torch.randn(3, 3, dtype=torch.float64, generator=gen)
    v = [p.detach().clone() for p in model.parameters()]
    q_before = pen.displacement(model)
    pen.prox(model, lr=0.1)  # lr * curvature = 0.1 * 2e4 / 0.05^2: an explicit step would blow up
    assert _prox_optimality(pen, model, v, 0.1) < 1e-9
    q = pen.displacement(model)
    assert bool((q.abs() <= q_before.abs() + 1e-15).all())  # the constrained displacements only shrink
    outside = (torch.eye(21, dtype=torch.float64) - P.T @ P) @ (torch.cat([model[0].weight.reshape(-1),
                                                                          model[2].weight.reshape(-1)]).detach() - w1)
    moved = torch.cat([v[0].reshape(-1), v[2].reshape(-1)]) - w1
    assert torch.allclose(outside, (torch.eye(21, dtype=torch.float64) - P.T @ P) @ moved, atol=1e-13)
    assert torch.equal(model[0].bias, v[1]) and torch.equal(model[4].weight, v[3])  # the other parameters stay


def test_ewc_prox_is_the_proximal_point_and_holds_only_the_chosen_weights(gen):
    model = net()
    fisher = {n: torch.rand(p.shape, dtype=torch.float64, generator=gen) for n, p in model.named_parameters()}
    top = EWCPenalty(model, fisher, lam=1e5, num_constraints=4)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.2
    v = [p.detach().clone() for p in model.parameters()]
    top.prox(model, lr=0.1)
    assert _prox_optimality(top, model, v, 0.1) < 1e-9
    moved = torch.cat([(p.detach() - v0).reshape(-1) for p, v0 in zip(model.parameters(), v)])
    assert int((moved != 0).sum()) == 4  # only the 4 largest-Fisher weights are pulled back


def test_proximal_training_step_is_a_gradient_step_then_the_prox(gen):
    X, t = torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randn(12, 1, dtype=torch.float64, generator=gen)
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    w0 = model[0].weight.detach().clone()
    fisher = {"0.weight": torch.rand(1, 3, dtype=torch.float64, generator=gen)}
    pen = EWCPenalty(model, fisher, lam=1e6)  # anchored at w0
    with torch.no_grad():
        model[0].weight += 1.0
    start = model[0].weight.detach().clone()
    SGDTrainer(model, X, t, batch_size=12, lr=0.05, loss_fn=F.mse_loss, penalty=pen, proximal=True).run(
        max_epochs=1, stopping_rule=None)
    v = start - 0.05 * (2 / 12) * (X @ start.T - t).T @ X
    assert torch.allclose(model[0].weight.detach(), w0 + (v - w0) / (1 + 0.05 * 1e6 * fisher["0.weight"]), rtol=1e-13)
    with pytest.raises(ValueError, match="proximal=True needs a penalty with a prox"):
        SGDTrainer(model, X, t, batch_size=12, penalty=lambda m: 0.0, proximal=True)


def test_matched_errors_interpolate_along_each_curve_and_never_extrapolate():
    from landscape_kernels.analyses.forgetting import matched_errors

    curves = {"a": [(0.0, 0.5), (0.1, 0.1), (float("nan"), 0.2)], "b": [(0.05, 0.3), (0.2, 0.0), (0.1, 0.25)]}
    got = matched_errors(curves, [0.0, 0.05, 0.1, 0.15, 0.3])
    assert got["a"] == [0.5, pytest.approx(0.3), 0.1, None, None]
    assert got["b"] == [None, 0.3, 0.25, pytest.approx(0.125), None]
