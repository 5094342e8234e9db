"""Hutchinson and XDiag diagonal estimators on matrices with known diagonals: exact where they must be,
unbiased within their standard errors, XDiag far ahead on a decaying spectrum, and per-parameter dicts
for the operators of a model."""
import pytest
import torch
from torch import nn

from landscape_kernels import GGNOperator, hutchinson_diagonal, xdiag_diagonal
from landscape_kernels.operators.diagonal import ggn_diagonal
from testing import seed_from, small_mlp


def decaying(gen, n=60, rate=0.7):
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]
    return U @ torch.diag(10 * rate ** torch.arange(n, dtype=torch.float64)) @ U.T


def test_hutchinson_is_exact_on_a_diagonal_matrix(gen):
    d = torch.rand(40, dtype=torch.float64, generator=gen)
    est = hutchinson_diagonal(torch.diag(d), num_probes=3)
    assert torch.allclose(est.diagonal, d, rtol=0, atol=1e-15) and est.products == 3
    assert est.parameters is None


def test_xdiag_is_exact_below_its_rank(gen):
    L = torch.randn(50, 4, dtype=torch.float64, generator=gen)
    A = L @ L.T
    est = xdiag_diagonal(A, num_products=12)
    assert torch.allclose(est.diagonal, A.diagonal(), rtol=0, atol=1e-11) and est.products == 12


def test_estimates_are_unbiased_within_their_standard_errors(gen):
    A = decaying(gen)
    for estimator in (hutchinson_diagonal, xdiag_diagonal):
        z = torch.stack([(e.diagonal - A.diagonal()) / e.stderr
                         for e in (estimator(A, 40, seed=s) for s in range(30))])
        assert z.mean().abs() < 0.2 and 0.5 < z.std() < 2.0, estimator.__name__


def test_xdiag_beats_hutchinson_on_a_decaying_spectrum(gen):
    A = decaying(gen)
    h = (hutchinson_diagonal(A, 40).diagonal - A.diagonal()).norm()
    x = (xdiag_diagonal(A, 40).diagonal - A.diagonal()).norm()
    assert x < 0.05 * h


def test_model_operators_give_parameter_shaped_estimates(gen):
    seed_from(gen)
    model = small_mlp((4, 3, 2), nn.Tanh)
    x, y = torch.randn(9, 4, dtype=torch.float64, generator=gen), torch.randint(0, 2, (9,), generator=gen)
    op = GGNOperator(model, torch.nn.functional.cross_entropy, (x, y))
    exact = ggn_diagonal(model, (x, y))
    est = xdiag_diagonal(op, num_products=24)  # 12 probes > rank <= N (C - 1) = 9: exact
    assert list(est.parameters) == list(exact)
    for name, value in exact.items():
        assert est.parameters[name].shape == value.shape
        assert torch.allclose(est.parameters[name], value, rtol=0, atol=1e-12)


def test_bad_counts_are_named():
    with pytest.raises(ValueError, match="num_probes must be an int >= 2"):
        hutchinson_diagonal(torch.eye(3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="num_products must be an int >= 4"):
        xdiag_diagonal(torch.eye(3, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="exceed the dimension 3"):
        xdiag_diagonal(torch.eye(3, dtype=torch.float64), 8)
