"""Stochastic Lanczos quadrature: the eigenvalue density of a symmetric operator.

One Lanczos chain per Rademacher probe, all chains advanced together (one ``matmat`` of all live chains
per step, one ``lanczos_reorth`` call for all of them); a chain that reaches an invariant subspace ends
early with exact quadrature.
"""
import math
from dataclasses import dataclass

import torch

from ..kernels import ops
from ..operators.base import as_operator
from .products import CountedProducts, rademacher


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: per probe, Gauss quadrature nodes and weights (each probe's weights
    sum to 1; zero-weight padding where a chain ended early), and the Gaussian-smoothed density on a grid
    (it integrates to 1)."""

    nodes: torch.Tensor  # (num_probes, num_steps) float64
    weights: torch.Tensor  # (num_probes, num_steps) float64
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_products: int

    def moment(self, p):
        """Estimate of tr(A^p) / P."""
        return float((self.weights * self.nodes.pow(p)).sum(1).mean())

    def to_dict(self):
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "grid": self.grid.tolist(),
                "density": self.density.tolist(), "sigma": self.sigma, "num_products": self.num_products}


def lanczos_quadrature(op, probes, num_steps):
    """Run one Lanczos chain per probe column, all chains advanced together (one ``matmat`` of all live
    chains per step, one ``lanczos_reorth`` call for all of them). Returns (nodes, weights, products)."""
    op = as_operator(op)
    P, n = probes.shape
    steps = min(int(num_steps), P)
    apply = CountedProducts(op, "spectral_density")
    Q = torch.zeros(n, steps + 1, P, dtype=op.dtype, device=op.device)
    Q[:, 0] = (probes / probes.norm(dim=0)).T.to(op.device, op.dtype)
    alpha = torch.zeros(n, steps, dtype=torch.float64)
    beta = torch.zeros(n, steps, dtype=torch.float64)
    length = torch.full((n,), steps, dtype=torch.long)  # steps each chain ran before it ended
    live = torch.ones(n, dtype=torch.bool)
    for j in range(steps):
        # while every chain is alive, slices are views; indexing by a tensor would copy all the bases
        idx = slice(None) if bool(live.all()) else live.nonzero().flatten()
        U = apply(Q[idx, j].T, j).T  # (live, P)
        a = (Q[idx, j] * U).sum(1).double().cpu()
        alpha[idx, j] = a
        W = U - a.to(U.dtype).to(U.device)[:, None] * Q[idx, j]
        if j:
            W = W - beta[idx, j - 1].to(U.dtype).to(U.device)[:, None] * Q[idx, j - 1]
        if j == steps - 1:
            break
        w, norms = ops.lanczos_reorth(Q[idx], W.unsqueeze(1), j + 1)
        norms = norms[:, 0].double().cpu()
        scale = alpha[idx, : j + 1].abs().amax(1).clamp_min(1e-300)
        ended = norms <= (1e-12 if op.dtype == torch.float64 else 1e-6) * scale
        beta[idx, j] = torch.where(ended, torch.zeros_like(norms), norms)
        Q[idx, j + 1] = w[:, 0] / norms.clamp_min(1e-300).to(w.dtype).to(w.device)[:, None]
        live_ids = torch.arange(n)[idx]
        for c in live_ids[ended].tolist():  # an invariant subspace: this probe's quadrature is exact
            live[c] = False
            length[c] = j + 1
        if not bool(live.any()):
            break
    nodes = torch.zeros(n, steps, dtype=torch.float64)
    weights = torch.zeros(n, steps, dtype=torch.float64)
    for c in range(n):
        m = int(length[c])
        T = torch.diag(alpha[c, :m]) + torch.diag(beta[c, : m - 1], 1) + torch.diag(beta[c, : m - 1], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[c, :m], weights[c, :m] = theta, S[0] ** 2
    return nodes, weights, apply.products


def spectral_density(op, num_probes=8, num_steps=80, grid=None, sigma=None, seed=0, grid_points=1000):
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature with Rademacher
    probes, all probes advanced together. ``sigma`` (default 1 % of the spectral range) is the width
    of the Gaussian kernel; ``grid`` defaults to ``grid_points`` points spanning the nodes +- 5 sigma."""
    op = as_operator(op)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf):
        raise ValueError(f"spectral_density: sigma must be None or a finite number > 0, got {sigma!r}")
    if grid is not None and (not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() == 0
                             or not bool(torch.isfinite(grid).all())):
        raise ValueError("spectral_density: grid must be None or a non-empty 1-D tensor of finite values")
    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise ValueError(f"spectral_density: grid_points must be an int >= 2, got {grid_points!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"spectral_density: num_probes must be a positive int, got {num_probes!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"spectral_density: num_steps must be a positive int, got {num_steps!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probes = rademacher(op.shape[0], num_probes, gen)
    nodes, weights, products = lanczos_quadrature(op, probes, num_steps)
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        sigma = 0.01 * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64) if grid is None else grid.double().cpu()
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - nodes[:, :, None]) / sigma) ** 2) / (sigma * (2 * math.pi) ** 0.5)
    density = (weights[:, :, None] * kernel).sum(1).mean(0)
    return SpectralDensity(nodes, weights, grid, density, float(sigma), products)
