"""Mori et al. 2022: noise strength and decoupling spectra against vmap per-sample gradients, dense P x P
matrices and linear-regression closed forms."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_kernels.analyses.noise_structure import (
    decoupling_spectra, half_squared_error, noise_strength, output_gradient_gram)
from testing import small_mlp


def _net(seed=0):
    return small_mlp((5, 7, 6, 1), seed=seed)


def _output_jacobian(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],)).reshape(())

    jac = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(params, x)
    return torch.cat([jac[n].reshape(x.shape[0], -1) for n in params], 1)


def test_noise_strength_equals_per_sample_gradients_and_linear_regression():
    model = _net()
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    J = _output_jacobian(model, x)
    with torch.no_grad():
        r = model(x).reshape(-1) - y
    G = r[:, None] * J
    want = float(G.square().sum(1).mean() - G.mean(0).square().sum())
    strength, loss = noise_strength(model, half_squared_error, x, y, chunk=7)
    assert strength == pytest.approx(want, rel=1e-10)
    assert loss == pytest.approx(float(0.5 * r.square().mean()), rel=1e-12)
    lin = nn.Sequential(nn.Linear(5, 1, bias=False)).double()  # f = theta . x: g_mu = r_mu x_mu
    with torch.no_grad():
        r = lin(x).reshape(-1) - y
    closed = float((r.square() * x.square().sum(1)).mean() - (r[:, None] * x).mean(0).square().sum())
    assert noise_strength(lin, half_squared_error, x, y)[0] == pytest.approx(closed, rel=1e-12)


def test_output_gradient_gram_and_decoupling_spectra_against_dense_matrices():
    model = _net(1)
    x, y = torch.randn(15, 5, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    J = _output_jacobian(model, x)
    torch.testing.assert_close(output_gradient_gram(model, x), J @ J.T, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        ell = 0.5 * (model(x).reshape(-1) - y).square()
    A = (J.T * ell) @ J / 15  # (P, P), P = 97
    B = ell.mean() * J.T @ J / 15
    s = decoupling_spectra(model, x, y)
    dense_a = torch.linalg.eigvalsh(A).flip(0).numpy()[: s.A.size]
    dense_b = torch.linalg.eigvalsh(B).flip(0).numpy()[: s.B.size]
    assert s.A.size >= 10
    np.testing.assert_allclose(s.A, dense_a, rtol=1e-8, atol=1e-12 * dense_a[0])
    np.testing.assert_allclose(s.B, dense_b, rtol=1e-8, atol=1e-12 * dense_b[0])
    assert s.loss == pytest.approx(float(ell.mean()))


def test_decoupling_is_exact_when_every_sample_loss_is_equal():
    """|f - y| the same for every sample: sum ell C_f = L sum C_f, so the spectra coincide."""
    model = _net(2)
    x = torch.randn(20, 5, dtype=torch.float64)
    with torch.no_grad():
        f = model(x).reshape(-1)
    y = f + 0.3 * torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).double()
    s = decoupling_spectra(model, x, y)
    assert s.log_ratio_top < 1e-10 and s.log_ratio_bottom < 1e-8 and s.top_relative < 1e-10


def test_bad_input_names_the_problem():
    model = _net()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="x is empty"):
        noise_strength(model, half_squared_error, x[:0], y[:0])
    with pytest.raises(ValueError, match="differ in samples"):
        decoupling_spectra(model, x, y[:3])
    two = nn.Sequential(nn.Linear(5, 2)).double()
    with pytest.raises(ValueError, match="one output"):
        output_gradient_gram(two, x)
