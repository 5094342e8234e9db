"""Randomised estimators of the diagonal of a symmetric operator, with per-entry standard errors.

- ``hutchinson_diagonal``: diag(A) ~ mean over Rademacher probes z of z * (A z) (Bekas, Kokiopoulou &
  Saad 2007); unbiased, exact for a diagonal A, error ~ the off-diagonal row norms / sqrt(probes);
- ``xdiag_diagonal``: XDiag (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample"):
  half the products sketch the range of A, whose part of the diagonal is taken exactly, and the other
  probes correct the rest, every probe serving both roles by leave-one-out; exact for a matrix of rank
  below the number of probes, and far more accurate than Hutchinson when the spectrum decays.

Both return a ``DiagonalEstimate``; for the operators of a model (which name their parameters) it also
holds the estimate as tensors shaped like the parameters.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..operators.base import as_operator
from .products import CountedProducts, rademacher


@dataclass
class DiagonalEstimate:
    """``diagonal`` and ``stderr`` (P,) tensors; ``parameters`` / ``parameter_stderr`` the same as dicts
    name -> tensor shaped like the parameter when the operator has parameters (else None); ``products``
    the operator products spent."""

    diagonal: torch.Tensor
    stderr: torch.Tensor
    products: int
    parameters: Optional[dict] = None
    parameter_stderr: Optional[dict] = None


def _estimate(op, diagonal, stderr, products):
    split = getattr(op, "as_parameter_dict", None)
    if split is None:
        return DiagonalEstimate(diagonal, stderr, products)
    return DiagonalEstimate(diagonal, stderr, products, split(diagonal), split(stderr))


def _probes(op, n, seed, name):
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"{name}: num_probes must be an int >= 2, got {n!r}")
    return rademacher(op.shape[0], n, torch.Generator().manual_seed(seed)).to(op.device, op.dtype)


def hutchinson_diagonal(op, num_probes=100, seed=0):
    """diag(A) ~ mean_k z_k * (A z_k) over ``num_probes`` Rademacher probes (one matmat for all of
    them); the standard error is the spread of the per-probe estimates over sqrt(num_probes)."""
    op = as_operator(op)
    Z = _probes(op, num_probes, seed, "hutchinson_diagonal")
    apply = CountedProducts(op, "hutchinson_diagonal")
    samples = Z * apply(Z, 0)
    return _estimate(op, samples.mean(1), samples.std(1) / math.sqrt(num_probes), apply.products)


def xdiag_diagonal(op, num_products=100, seed=0):
    """XDiag with ``num_products`` operator products (m = num_products // 2 probes, each applied twice:
    once in the range sketch Y = A Omega, once in Z = A Q). Each probe i gives an estimate from the
    range of the other probes plus its own correction,
    d_i = diag(Q_(i) Q_(i)^T A) + omega_i * ((I - Q_(i) Q_(i)^T) A omega_i); the estimate is their mean
    and the standard error their spread over sqrt(m)."""
    op = as_operator(op)
    if not isinstance(num_products, int) or num_products < 4:
        raise ValueError(f"xdiag_diagonal: num_products must be an int >= 4, got {num_products!r}")
    m = num_products // 2
    if m > op.shape[0]:
        raise ValueError(f"xdiag_diagonal: num_products // 2 = {m} probes exceed the dimension {op.shape[0]}; "
                         f"use at most {2 * op.shape[0]} products (or the exact diagonal)")
    apply = CountedProducts(op, "xdiag_diagonal")
    Omega = _probes(op, m, seed, "xdiag_diagonal")
    Y = apply(Omega, 0)
    Q, R = torch.linalg.qr(Y)
    Z = apply(Q, 1)  # A Q (= (A^T Q) for a symmetric A)
    T = Z.T @ Omega  # Q^T A Omega
    # S's columns s_i: Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T, the range of Y without column i
    S = torch.linalg.solve_triangular(R, torch.eye(m, dtype=R.dtype, device=R.device), upper=True).T
    S = S / S.norm(dim=0, keepdim=True)
    QS, ZS = Q @ S, Z @ S
    ST = (S * T).sum(0)  # s_i^T T_i
    exact = (Q * Z).sum(1, keepdim=True)  # diag(Q Q^T A)
    per_probe = exact - QS * ZS + Omega * (Y - Q @ T + QS * ST)
    return _estimate(op, per_probe.mean(1), per_probe.std(1) / math.sqrt(m), apply.products)
