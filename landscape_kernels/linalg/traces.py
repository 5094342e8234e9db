"""Randomised trace and Frobenius-norm estimators for symmetric operators (any object with matmat).

Every estimator takes a ``seed`` and returns (estimate, standard error of the estimate)."""
import math

import torch

from ..operators.base import as_operator
from .products import CountedProducts, rademacher


def _check_count(n, name, least=1):
    if not isinstance(n, int) or n < least:
        raise ValueError(f"{name} must be an int >= {least}, got {n!r}")


def hutchinson_trace(op, num_probes=100, seed=0):
    """tr(A) ~ mean of v^T A v over Rademacher probes v (one matmat for all probes)."""
    op = as_operator(op)
    _check_count(num_probes, "hutchinson_trace: num_probes", 2)
    V = rademacher(op.shape[0], num_probes, torch.Generator().manual_seed(seed)).to(op.device, op.dtype)
    samples = (V * CountedProducts(op, "hutchinson_trace")(V, 0)).sum(0).double()
    return float(samples.mean()), float(samples.std() / math.sqrt(num_probes))


def hutchpp_trace(op, num_products=99, seed=0):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): the trace of A on a sketched top subspace exactly,
    plus Hutchinson on the deflated rest; num_products split in thirds. Far fewer products than
    Hutchinson for the same accuracy when the spectrum decays."""
    op = as_operator(op)
    _check_count(num_products, "hutchpp_trace: num_products", 6)
    apply = CountedProducts(op, "hutchpp_trace")
    P, third = op.shape[0], num_products // 3
    gen = torch.Generator().manual_seed(seed)
    S = rademacher(P, third, gen).to(op.device, op.dtype)
    G = rademacher(P, num_products - 2 * third, gen).to(op.device, op.dtype)
    Q = torch.linalg.qr(apply(S, 0))[0]
    exact = float((Q * apply(Q, 1)).sum())
    G = G - Q @ (Q.T @ G)
    samples = (G * apply(G, 2)).sum(0).double()
    return exact + float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))


def frobenius_norm(op, num_probes=50, seed=0):
    """||A||_F ~ sqrt(mean ||A v||^2) over Rademacher probes (E ||A v||^2 = tr(A^T A)); the standard
    error is propagated through the square root."""
    op = as_operator(op)
    _check_count(num_probes, "frobenius_norm: num_probes", 2)
    V = rademacher(op.shape[0], num_probes, torch.Generator().manual_seed(seed)).to(op.device, op.dtype)
    samples = CountedProducts(op, "frobenius_norm")(V, 0).double().pow(2).sum(0)
    mean = float(samples.mean())
    return math.sqrt(mean), float(samples.std() / math.sqrt(num_probes)) / (2 * math.sqrt(max(mean, 1e-300)))
