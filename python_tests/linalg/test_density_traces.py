"""Stochastic Lanczos quadrature and the trace estimators on matrices with known spectra."""
import math

import pytest
import torch

from landscape_kernels.linalg.density import lanczos_quadrature, spectral_density
from landscape_kernels.linalg.products import rademacher
from landscape_kernels.operators.base import DenseOperator
from landscape_kernels.linalg.traces import frobenius_norm, hutchinson_trace, hutchpp_trace


def decaying(P, gen):
    V = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64, generator=gen))[0]
    lam = torch.cat([10.0 * 0.7 ** torch.arange(12, dtype=torch.float64),
                     0.05 * (torch.rand(P - 12, generator=gen, dtype=torch.float64) - 0.3)])
    return (V * lam) @ V.T, lam


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_quadrature_is_exact_per_probe(dtype, gen):
    A, _ = decaying(200, gen)
    m = 12
    probes = rademacher(200, 5, torch.Generator().manual_seed(3))
    nodes, weights, products = lanczos_quadrature(A.to(dtype), probes, m)
    assert products == 5 * m
    assert torch.allclose(weights.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-6 if dtype == torch.float32 else 1e-12)
    v = probes / probes.norm(dim=0)
    Ap = v.clone()
    for p in range(1, 2 * m):  # Gauss quadrature with m nodes is exact up to degree 2m - 1
        Ap = A @ Ap
        exact = (v * Ap).sum(0)
        quad = (weights * nodes.pow(p)).sum(1)
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        assert torch.allclose(quad, exact, rtol=tol, atol=tol * 10.0 ** p), (p, quad, exact)
        if p >= 6:
            break


def test_batched_chains_equal_sequential_ones(gen):
    A, _ = decaying(150, gen)
    probes = rademacher(150, 4, torch.Generator().manual_seed(1))
    nodes, weights, _ = lanczos_quadrature(A, probes, 20)
    for c in range(4):
        n1, w1, _ = lanczos_quadrature(A, probes[:, c : c + 1], 20)
        assert torch.allclose(n1[0], nodes[c], atol=1e-10) and torch.allclose(w1[0], weights[c], atol=1e-12)


def test_chains_end_on_invariant_subspaces(gen):
    V = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=gen))[0]
    lam = torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0], dtype=torch.float64).repeat(12)  # 5 distinct values
    A = (V * lam) @ V.T
    sd = spectral_density(A, num_probes=3, num_steps=30, seed=2)
    assert sd.num_products <= 3 * 6  # every chain ends after at most 5 steps (+ the last product)
    for c in range(3):
        used = sd.weights[c] > 0
        assert int(used.sum()) == 5
        assert torch.allclose(sd.nodes[c][used].sort().values, lam.unique().sort().values, atol=1e-9)
    assert sd.moment(1) == pytest.approx(float(lam.mean()), rel=0.5)  # stochastic, only a sanity check


def test_density_integrates_to_one_and_sits_on_the_spectrum(gen):
    A, lam = decaying(300, gen)
    sd = spectral_density(A, num_probes=6, num_steps=40, seed=4)
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
    assert float(sd.grid.min()) < float(lam.min()) and float(sd.grid.max()) > float(lam.max())
    assert float(sd.nodes.max()) == pytest.approx(float(lam.max()), rel=1e-8)  # the top outlier is found


def test_trace_estimators_within_their_error_bars(gen):
    A, lam = decaying(300, gen)
    true_trace, true_fro = float(lam.sum()), float(lam.norm())
    est, se = hutchinson_trace(A, num_probes=300, seed=1)
    assert abs(est - true_trace) <= 4 * se
    est_pp, se_pp = hutchpp_trace(A, num_products=300, seed=1)
    assert abs(est_pp - true_trace) <= 4 * se_pp + 1e-9
    assert se_pp < se / 5  # deflating the top subspace pays off on a decaying spectrum
    fro, se_f = frobenius_norm(A, num_probes=300, seed=1)
    assert abs(fro - true_fro) <= 4 * se_f


def test_bad_input():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match="sigma must be None or a finite number > 0"):
        spectral_density(A, num_probes=2, num_steps=3, sigma=-1.0)
    with pytest.raises(ValueError, match="hutchpp_trace: num_products must be an int >= 6"):
        hutchpp_trace(A, num_products=3)
    with pytest.raises(ValueError, match="hutchinson_trace: num_probes must be an int >= 2"):
        hutchinson_trace(A, num_probes=1)

    class Broken(DenseOperator):
        def matmat(self, V):
            return V * math.nan

    with pytest.raises(FloatingPointError, match="NaN/Inf at Lanczos step 0"):
        spectral_density(Broken(A), num_probes=2, num_steps=3)
