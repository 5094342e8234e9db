"""Zhang, Yang & Tu 2026: per-sample layer Hessians from their Kronecker factors, minibatch covariance, the
superlinear fit, checked against torch.func per-sample Hessians and closed forms."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_kernels.analyses.noise_curvature import (
    hessian_second_moment, layer_factors, layer_hessian, minibatch_assignment, minibatch_covariance,
    minibatch_gradients, mse_on_softmax, random_rotation, relative_commutator, superlinear_relation)
from testing import small_mlp


def _relu_net(seed=0, widths=(6, 5, 4, 3)):
    return small_mlp(widths, bias=False, seed=seed)


def _per_sample_hessians(model, loss_fn, x, y, param):
    """(N, D, D) Hessians of each sample's loss in ``param`` by torch.func (the oracle)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_at(w, xi, yi):
        return loss_fn(torch.func.functional_call(model, {**params, param: w}, (xi[None],)), yi[None])

    w = params[param]
    h = torch.func.vmap(torch.func.hessian(loss_at), in_dims=(None, 0, 0))(w, x, y)
    return h.reshape(x.shape[0], w.numel(), w.numel())


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, mse_on_softmax], ids=["ce", "mse_softmax"])
@pytest.mark.parametrize("param", ["2.weight", "0.weight", "4.weight"])
def test_kronecker_factors_equal_per_sample_hessians(loss_fn, param):
    model = _relu_net()
    x, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 3, (13,))
    f = layer_factors(model, loss_fn, x, y, param, chunk=5)
    exact = _per_sample_hessians(model, loss_fn, x, y, param)
    kron = torch.stack([torch.kron(f.G[p], torch.outer(f.a[p], f.a[p])) for p in range(13)])
    torch.testing.assert_close(kron, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer_hessian(f), exact.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessian_second_moment(f), (exact @ exact).mean(0), rtol=1e-10, atol=1e-12)


def test_two_layer_linear_network_by_hand():
    """f = W2 W1 x with loss 1/2 |f - y|^2: h_p = (W2^T W2) (x) x x^T for W1, by hand."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)

    def half_sq(out, t):
        return 0.5 * (out - t).square().sum(1).mean()

    f = layer_factors(model, half_sq, x, y, "0.weight")
    W2 = model[1].weight.detach()
    torch.testing.assert_close(f.G, (W2.T @ W2).expand(9, 3, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.a, x)
    torch.testing.assert_close(layer_hessian(f), torch.kron(W2.T @ W2, x.T @ x / 9), rtol=1e-12, atol=1e-12)
    second = sum(torch.kron(W2.T @ W2 @ W2.T @ W2, x[p].dot(x[p]) * torch.outer(x[p], x[p])) for p in range(9)) / 9
    torch.testing.assert_close(hessian_second_moment(f), second, rtol=1e-12, atol=1e-12)


def test_layer_factors_reject_bad_input():
    model = _relu_net()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="param must be the weight of a Linear"):
        layer_factors(model, F.cross_entropy, x, y, "1.weight")
    with pytest.raises(ValueError, match="unsupported: 1 \\(Tanh\\)"):
        layer_factors(nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 3)).double(), F.cross_entropy, x, y,
                      "0.weight")
    with pytest.raises(ValueError, match="x is empty"):
        layer_factors(model, F.cross_entropy, x[:0], y[:0], "2.weight")


def test_minibatch_assignment_partitions_and_drops_the_partial_batch():
    b = minibatch_assignment(23, 5, seed=3)
    assert (b == -1).sum() == 3
    assert torch.bincount(b[b >= 0]).tolist() == [5, 5, 5, 5]
    assert torch.equal(b, minibatch_assignment(23, 5, seed=3))
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_assignment(4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_minibatch_gradients_equal_the_loop(dtype):
    model = _relu_net().to(dtype)
    x, y = torch.randn(47, 6, dtype=dtype), torch.randint(0, 3, (47,))
    fused = minibatch_gradients(model, F.cross_entropy, x, y, "2.weight", batch_size=6, seed=1, method="fused", chunk=10)
    factored = minibatch_gradients(model, F.cross_entropy, x, y, "2.weight", batch_size=6, seed=1, chunk=13)
    loop = minibatch_gradients(model, F.cross_entropy, x, y, "2.weight", batch_size=6, seed=1, method="loop")
    assert fused.shape == factored.shape == (7, 20)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused, loop, rtol=tol, atol=tol)
    torch.testing.assert_close(factored, loop, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="needs the weight of an nn.Linear"):
        minibatch_gradients(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(dtype),
                            F.cross_entropy, torch.randn(12, 1, 6, dtype=dtype), y[:12], "0.weight", batch_size=6)
    with pytest.raises(ValueError, match="not a parameter"):
        minibatch_gradients(model, F.cross_entropy, x, y, "9.weight", batch_size=6)


def test_minibatch_covariance_of_linear_regression_closed_forms():
    """B = 1: C is (1/N) sum g g^T - gbar gbar^T exactly; B = N: C = 0."""
    torch.manual_seed(2)
    N, d = 30, 4
    model = nn.Sequential(nn.Linear(d, 1, bias=False)).double()
    x, y = torch.randn(N, d, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64)

    def half_sq(out, t):
        return 0.5 * (out - t).square().sum(1).mean()

    theta = model[0].weight.detach()[0]
    g = (x @ theta - y[:, 0])[:, None] * x
    exact = g.T @ g / N - torch.outer(g.mean(0), g.mean(0))
    C1 = minibatch_covariance(minibatch_gradients(model, half_sq, x, y, "0.weight", batch_size=1))
    torch.testing.assert_close(C1, exact, rtol=1e-12, atol=1e-12)
    CN = minibatch_covariance(minibatch_gradients(model, half_sq, x, y, "0.weight", batch_size=N))
    assert CN.abs().max() < 1e-14


def _spectrum_pair(D=40, exponent=1.5, seed=0):
    Q = random_rotation(D, seed)
    lam = torch.logspace(-3, 1, D, dtype=torch.float64)
    return Q @ torch.diag(lam) @ Q.T, Q @ torch.diag(lam ** exponent) @ Q.T, Q, lam


def test_superlinear_relation_recovers_a_planted_exponent():
    H, C, Q, lam = _spectrum_pair()
    r = superlinear_relation(H, C, top=30, second_moment=H @ H, seed=1)
    assert r.gamma.exponent == pytest.approx(1.5, abs=1e-9)
    assert r.gamma.r2 == pytest.approx(1.0, abs=1e-12)
    assert r.predicted.exponent == pytest.approx(2.0, abs=1e-9)
    assert r.used.sum() == 30
    assert r.commutator < 1e-12 < 0.1 < r.random_commutator
    torch.testing.assert_close(torch.as_tensor(r.H_ii), lam.flip(0)[:30])


def test_superlinear_relation_drops_non_positive_pairs_and_checks_input():
    H, C, _, _ = _spectrum_pair()
    C = C - 0.5 * torch.eye(40, dtype=torch.float64)  # the flattest directions get C_ii < 0
    r = superlinear_relation(H, C, top=40)
    assert 3 <= r.used.sum() < 40 and (r.C_ii[r.used] > 0).all()
    with pytest.raises(ValueError, match="C must be a square matrix"):
        superlinear_relation(H, C[:5])
    with pytest.raises(ValueError, match="top must be"):
        superlinear_relation(H, C, top=41)
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        superlinear_relation(H, bad)


def test_relative_commutator_is_zero_for_commuting_and_scale_free():
    H, C, _, _ = _spectrum_pair(D=12, exponent=1.2)
    assert relative_commutator(C, H) < 1e-12
    A = torch.randn(12, 12, dtype=torch.float64)
    A = A @ A.T
    assert relative_commutator(3 * A, H) == pytest.approx(relative_commutator(A, H), rel=1e-12)
