"""Feng & Tu 2021 building blocks on problems with known answers."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from landscape_kernels.analyses.directional import per_sample_directional_derivatives
from landscape_kernels.analyses.fits import power_law_fit
from landscape_kernels.analyses.variance_flatness import (active_temperature, flatness_along_pcs, mlf_ensemble,
                                                          n90_excluding_pc1, psi_fit, trajectory_pca)
from landscape_kernels.linalg.profiles import FlatnessResult


def orthonormal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]  # columns q_i


def test_power_law_fit_recovers_an_exact_law_and_rejects_bad_input():
    x = np.arange(1, 30)
    fit = power_law_fit(x, 3.0 * x ** -2.5)
    assert abs(fit.exponent + 2.5) < 1e-12 and fit.stderr < 1e-10 and fit.r2 > 1 - 1e-12
    noisy = power_law_fit(x, 3.0 * x ** -2.5 * np.exp(0.1 * np.random.default_rng(0).standard_normal(29)))
    assert noisy.ci95[0] < -2.5 < noisy.ci95[1]
    with pytest.raises(ValueError, match="positive and finite"):
        power_law_fit([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match="at least 3 points"):
        power_law_fit([1, 2], [1, 2])


def test_n90_excluding_pc1():
    assert n90_excluding_pc1([10.0, 4, 3, 2, 1]) == 4  # 4, 7, 9 of 10: the 90 % is reached at PC4
    assert n90_excluding_pc1([10.0, 1]) == 2


def test_pca_of_a_planted_trajectory(gen):
    N, T, gamma = 60, 4000, 2.5
    Q = orthonormal(N, gen)
    lam = torch.arange(1, N + 1, dtype=torch.float64) ** -gamma
    mean = 5 * Q[:, 0] + 0.5 * Q[:, 1]
    X = mean + (torch.randn(T, N, generator=gen, dtype=torch.float64) * lam.sqrt()) @ Q.T
    res = trajectory_pca(X.float(), gamma_range=(20, None), chunk=1500)
    assert res.num_snapshots == T and res.variances.shape == (N,)
    assert abs(res.gamma - gamma) < 0.1 and res.gamma_fit.ci95[0] < gamma + 0.05
    assert torch.allclose(res.variances, lam, rtol=0.15)
    assert abs(res.cos_p1_mean - 5 / 25.25 ** 0.5) < 1e-2 and abs(res.ratio_12 - 2 ** gamma) < 0.3 * 2 ** gamma
    theta = res.project(X, [1, 2])
    assert torch.allclose(theta.var(0), res.variances[:2], rtol=1e-4)  # float32 snapshots
    with pytest.raises(ValueError, match="fewer than 3 PCs"):
        trajectory_pca(X, gamma_range=(59, None))


def planted_landscape(F_true, gen, L0=0.3):
    """ln L(w) = ln L0 + sum_i 4 ((w - w0) . q_i)^2 / F_i^2, the loss of Feng & Tu 2021's derivation, with a
    known flatness F_i along every q_i; the 'model' is one Linear weight read out by identity inputs."""
    n = len(F_true)
    Q = orthonormal(n, gen)
    model = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    w0 = model[0].weight.detach().flatten().clone()
    Fs = torch.tensor(F_true, dtype=torch.float64)

    def loss_fn(out, target):
        c = (out[:, 0] - target) @ Q  # coordinates of w - w0 along the q_i
        return L0 * torch.exp((4 * c**2 / Fs**2).sum())

    return model, loss_fn, (torch.eye(n, dtype=torch.float64), w0), Q


def test_flatness_along_pcs_of_a_planted_landscape(gen):
    F_true = [3.0, 10.0, 40.0, 150.0, 5000.0]
    model, loss_fn, data, Q = planted_landscape(F_true, gen)
    res = flatness_along_pcs(model, loss_fn, data, Q.T, [1, 2, 3, 4, 5], param="0.weight")
    assert torch.allclose(res.widths[:4], torch.tensor(F_true[:4], dtype=torch.float64), atol=0.02)
    assert res.saturated_left.tolist() == [False] * 4 + [True] and res.saturated_right.tolist()[-1]
    w0 = model[0].weight.detach().flatten()
    moved = flatness_along_pcs(model, loss_fn, data, Q.T, [2], param="0.weight", center=w0 + 0.3 * Q[:, 1])
    assert abs(float(moved.widths[0]) - 10.0) < 0.02 and abs(float(moved.right[0]) - (5.0 - 0.3)) < 0.02
    assert torch.equal(model[0].weight.detach().flatten(), w0)  # the model itself never moves
    with pytest.raises(ValueError, match="pcs must lie in \\[1, 5\\]"):
        flatness_along_pcs(model, loss_fn, data, Q.T, [0], param="0.weight")


def test_psi_fit_excludes_pc1_and_saturated_sides():
    pcs = torch.tensor([1, 11, 21, 31, 41, 51])
    widths = torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0], dtype=torch.float64)
    var = torch.zeros(60, dtype=torch.float64)
    var[pcs - 1] = 7.0 * widths**-4
    var[0] = 1e3  # PC1 off the law: must not count
    sat = torch.tensor([False, False, False, False, False, True])
    flat = FlatnessResult(widths, -widths / 2, widths / 2, sat, torch.zeros(6, dtype=torch.bool), 0.1, 1.0)
    var[50] = 1e-9  # the saturated one is off the law too
    res = psi_fit(var, pcs, flat)
    assert abs(res.psi - 4.0) < 1e-12 and res.pcs == [11, 21, 31, 41]


def regression(gen, N=40, n=4):
    X = torch.randn(N, n, generator=gen, dtype=torch.float64)
    t = X @ torch.randn(n, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    return model, X, t[:, None]


def test_mlf_ensemble_on_least_squares_both_methods(gen):
    model, X, t = regression(gen)
    P = orthonormal(4, gen).T[:2].reshape(2, 1, 4)  # two unit directions of the 1 x 4 weight
    B, count = 5, 8
    ens = mlf_ensemble(model, F.mse_loss, X, t, P, B, num_minibatches=count, seed=3, param="0.weight")
    par = mlf_ensemble(model, F.mse_loss, X, t, P, B, num_minibatches=count, seed=3, param="0.weight",
                       method="parabola", halfwidth=0.7, points=5)
    # closed form: L^mu(w + theta p) = (1/B) sum (r_b + theta x_b.p)^2
    batches = torch.randperm(40, generator=torch.Generator().manual_seed(3))[: B * count].reshape(count, B)
    w = model[0].weight.detach()[0]
    for d in range(2):
        p = P[d, 0]
        for m, idx in enumerate(batches):
            r, u = X[idx] @ w - t[idx, 0], X[idx] @ p
            g, M = 2 * (r * u).mean(), 2 * (u * u).mean()
            assert abs(float(ens.curvature[m, d]) - float(M)) <= 1e-12 * float(M)
            assert abs(float(ens.theta_star[m, d]) + float(g / M)) <= 1e-10 * (1 + abs(float(g / M)))
    assert torch.allclose(par.theta_star, ens.theta_star, rtol=1e-8, atol=1e-10)
    assert torch.allclose(par.curvature, ens.curvature, rtol=1e-8)
    assert torch.allclose(ens.sigma_tilde2, ens.theta_star.var(0)) and torch.allclose(ens.M0, ens.curvature.mean(0))
    assert torch.allclose(ens.noise_strength, ens.M0**2 * ens.sigma_tilde2) and ens.nonconvex.tolist() == [0, 0]
    with pytest.raises(ValueError, match="need 4100 samples, the data has 40"):
        mlf_ensemble(model, F.mse_loss, X, t, P, 41, num_minibatches=100, param="0.weight")


def test_active_temperature_equals_the_variance_over_every_minibatch(gen):
    model, X, t = regression(gen, N=8, n=3)
    P = orthonormal(3, gen).T.reshape(3, 1, 3)
    lr, B = 0.1, 3
    T = active_temperature(model, F.mse_loss, X, t, P, lr, B, offsets=(0.0, 0.4), param="0.weight")
    w = model[0].weight.detach()[0]
    for d in range(3):
        for g, delta in enumerate((0.0, 0.4)):
            wd = w + delta * P[d, 0]
            derivs = []  # dL^mu/d delta for every one of the C(8, 3) minibatches
            for idx in itertools.combinations(range(8), B):
                idx = list(idx)
                derivs.append(float((2 * (X[idx] @ wd - t[idx, 0]) * (X[idx] @ P[d, 0])).mean()))
            want = lr / 2 * np.var(derivs)
            assert abs(float(T[d, g]) - want) <= 1e-10 * want
    with_repl = active_temperature(model, F.mse_loss, X, t, P, lr, B, param="0.weight", sampling="with_replacement")
    assert torch.allclose(with_repl[:, 0], T[:, 0] * (8 - 1) / (8 - B))
    with pytest.raises(ValueError, match="sampling must be one of"):
        active_temperature(model, F.mse_loss, X, t, P, lr, B, param="0.weight", sampling="poisson")


class Wrapped(nn.Module):  # not an nn.Sequential: the generic path of the directional derivatives
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("wrapped", [False, True])
def test_directional_derivatives_match_per_sample_autograd(wrapped, gen):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model = Wrapped(net) if wrapped else net
    name = "net.2.weight" if wrapped else "2.weight"
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    V = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    d1, d2 = per_sample_directional_derivatives(model, F.cross_entropy, x, y, name, V, chunk=4, direction_chunk=2)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(w, xb, yb):
        return F.cross_entropy(functional_call(model, {**params, name: w}, (xb[None],)), yb[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params[name], x, y)  # (9, 4, 4)
    assert torch.allclose(d1, torch.einsum("pij,kij->pk", g, V), rtol=1e-12, atol=1e-14)
    for p in range(9):
        H = torch.autograd.functional.hessian(lambda w, p=p: sample_loss(w.reshape(4, 4), x[p], y[p]), params[name].flatten())
        want = torch.einsum("ki,ij,kj->k", V.reshape(3, 16), H, V.reshape(3, 16))
        assert torch.allclose(d2[p], want, rtol=1e-10, atol=1e-13)


def test_trajectory_pca_of_a_wide_window_uses_the_gram_matrix_and_is_exact():
    # N beyond what an N x N scatter matrix may take (every weight of a network): T x T Gram path
    g = torch.Generator().manual_seed(3)
    T, N = 40, 21_000
    snaps = torch.randn(T, 6, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 6, dtype=torch.float64)
    snaps = snaps @ torch.linalg.qr(torch.randn(N, 6, generator=g, dtype=torch.float64))[0].T
    snaps += 1e-6 * torch.randn(T, N, generator=g, dtype=torch.float64)
    pca = trajectory_pca(snaps.float(), gamma_range=(1, None))
    centred = snaps.float().double() - snaps.float().double().mean(0)
    want = torch.linalg.svdvals(centred) ** 2 / (T - 1)
    assert torch.allclose(pca.variances[:6], want[:6], rtol=1e-6)
    assert pca.components.shape[1] == N


def test_flatness_along_pcs_over_several_matrices_matches_one_matrix(gen):
    from testing import small_mlp

    model = small_mlp((5, 4, 3), bias=False, seed=1)
    x, y = torch.randn(40, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    d2 = torch.randn(2, 12, dtype=torch.float64, generator=gen)
    d2 = d2 / d2.norm(dim=1, keepdim=True)
    both = torch.cat([torch.zeros(2, 20, dtype=torch.float64), d2], 1)  # (0.weight, 2.weight), only 2.weight moves
    one = flatness_along_pcs(model, F.cross_entropy, (x, y), d2, [1, 2], param="2.weight", step=5.0, cap=50.0)
    two = flatness_along_pcs(model, F.cross_entropy, (x, y), both, [1, 2], param=["0.weight", "2.weight"], step=5.0,
                             cap=50.0)
    assert torch.allclose(one.widths, two.widths, atol=1e-9)
