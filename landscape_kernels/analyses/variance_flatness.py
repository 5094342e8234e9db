"""Feng & Tu's inverse variance-flatness relation (PNAS 2021; ``docs/methods.md``), one function per quantity.

- ``trajectory_pca``: PCA of the weight snapshots of the window; spectrum, gamma (sigma_i^2 ~ i^-gamma,
  i >= 20), n90 excluding PC1, cos(p1, <w>), sigma_1^2 / sigma_2^2 and the projections theta_i(t).
- ``flatness_along_pcs``: F_i along chosen PCs (Feng & Tu 2021 search) from the final weights or <w>.
- ``psi_fit``: sigma_i^2 ~ F_i^-psi, PC1 and saturated sides excluded.
- ``mlf_ensemble``: the minibatch loss-function ensemble (Feng & Tu 2021), by derivatives or parabolas.
- ``active_temperature``: T_i(delta theta) = (alpha / 2) Var_mu[dL^mu/d delta theta] (Feng & Tu 2021).

Every function takes the pieces it needs (a model, data, the components) so each can be used alone;
``landscape_kernels.reproduce`` chains them into the report.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..capture.model import chosen_parameters
from ..linalg.profiles import flatness, loss_profiles
from ..trajectory.pca import StreamingPCA
from .directional import per_sample_directional_derivatives
from .fits import power_law_fit

SAMPLING = ("without_replacement", "with_replacement")


@dataclass
class TrajectoryPCA:
    """PCA of a window of snapshots: ``variances`` (k,) descending, ``components`` (k, N) unit rows,
    ``mean`` (N,), and the Feng & Tu 2021 diagnostics."""

    variances: torch.Tensor
    components: torch.Tensor
    mean: torch.Tensor
    gamma: float
    gamma_fit: object
    n90: int
    cos_p1_mean: float
    ratio_12: float
    num_snapshots: int

    def project(self, snapshots, pcs):
        """theta_i(t) = (w(t) - <w>) . p_i for the 1-based PC indices ``pcs``: (T, len(pcs)) float64."""
        idx = torch.as_tensor(pcs, dtype=torch.long) - 1
        return (snapshots.double() - self.mean) @ self.components[idx].T

    def to_dict(self):
        return {"variances": self.variances.tolist(), "gamma": self.gamma, "gamma_fit": self.gamma_fit.to_dict(),
                "n90": self.n90, "cos_p1_mean": self.cos_p1_mean, "ratio_12": self.ratio_12,
                "num_snapshots": self.num_snapshots}


def n90_excluding_pc1(variances, level=0.9):
    """Smallest n with sum_{i=2}^n sigma_i^2 >= level * sum_{i>=2} sigma_i^2 (Feng & Tu 2021)."""
    rest = torch.as_tensor(variances, dtype=torch.float64)[1:]
    if rest.numel() == 0 or float(rest.sum()) <= 0:
        raise ValueError("n90_excluding_pc1: needs at least two components with positive variance beyond PC1")
    share = torch.cumsum(rest, 0) / rest.sum()
    return int(torch.nonzero(share >= level - 1e-12)[0, 0]) + 2


def trajectory_pca(snapshots, gamma_range=(20, None), chunk=4096):
    """PCA of the (T, N) window (a tensor, or an iterable of (T_c, N) chunks) in float64, exact: the
    N x N scatter matrix where it fits in memory, else (a tensor with T < N, e.g. every weight of a
    network) the T x T Gram matrix.
    ``gamma_range`` (first, last) 1-based PCs of the power-law fit; last is capped at (and None means)
    the last PC whose variance exceeds 1e-12 of the largest (rounding noise beyond it would bend the fit).
    Feng & Tu 2021 fix only first = 20; a measured spectrum steepens towards its end, so the fitted gamma
    depends on last, which the caller should report."""
    if isinstance(snapshots, torch.Tensor) and snapshots.shape[0] < snapshots.shape[1] \
            and not StreamingPCA().exact_fits(snapshots.shape[1]):
        pca = StreamingPCA(mode="gram").fit(snapshots)
    else:
        pca = StreamingPCA(mode="exact")
        chunks = [snapshots[s : s + chunk] for s in range(0, snapshots.shape[0], chunk)] \
            if isinstance(snapshots, torch.Tensor) else snapshots
        for c in chunks:
            pca.partial_fit(c)
    var = pca.explained_variance_.double().cpu()
    comps = pca.components_.double().cpu()
    mean = pca.mean_.double().cpu()
    first, last = gamma_range
    rank = int((var > 1e-12 * var[0]).sum())
    last = rank if last is None else min(int(last), rank)
    if not 1 <= int(first) <= last - 2:
        raise ValueError(f"trajectory_pca: gamma_range {gamma_range} leaves fewer than 3 PCs with positive variance "
                         f"(there are {var.numel()} components)")
    i = np.arange(int(first), last + 1)
    fit = power_law_fit(i, var[int(first) - 1 : last].numpy())
    cos = float((comps[0] @ mean).abs() / mean.norm().clamp_min(1e-300))
    return TrajectoryPCA(var, comps, mean, -fit.exponent, fit, n90_excluding_pc1(var), cos,
                         float(var[0] / var[1]) if var.numel() > 1 else float("inf"), int(pca.n_samples_seen_))


def _model_at(model, params, value):
    """A copy of ``model`` with ``params`` (names, flattened in order) set to ``value`` (the model itself is
    never changed)."""
    moved = copy.deepcopy(model)
    offset = 0
    with torch.no_grad():
        for target in chosen_parameters(moved, params)[1]:
            target.copy_(value[offset : offset + target.numel()].reshape(target.shape))
            offset += target.numel()
    return moved


def flatness_along_pcs(model, loss_fn, data, components, pcs, param="2.weight", center=None, **kwargs):
    """Feng & Tu's (2021) flatness along the 1-based PCs ``pcs`` (unit ``components`` rows), only ``param``
    moving (a name, or a list of names whose flattened values, in that order, are the components'
    coordinates), from the model's weights (``center`` None: w0, the end of training) or from ``center``
    (e.g. the window mean <w>). ``kwargs`` go to ``flatness`` (threshold, step, cap, tol, ...)."""
    params = [param] if isinstance(param, str) else list(param)
    idx = torch.as_tensor(pcs, dtype=torch.long) - 1
    if int(idx.min()) < 0 or int(idx.max()) >= components.shape[0]:
        raise ValueError(f"flatness_along_pcs: pcs must lie in [1, {components.shape[0]}], got {list(map(int, pcs))}")
    base = model if center is None else _model_at(model, params, center.reshape(-1))
    dirs = components[idx].to(dict(base.named_parameters())[params[0]].dtype)
    return flatness(base, loss_fn, data, dirs, params=params, **kwargs)


@dataclass
class PsiFit:
    psi: float
    fit: object
    pcs: list  # the PCs used

    def to_dict(self):
        return {"psi": self.psi, "fit": self.fit.to_dict(), "pcs": self.pcs}


def psi_fit(variances, pcs, flat):
    """sigma_i^2 ~ F_i^-psi over the analysed ``pcs`` (1-based), excluding PC1 and any direction with a
    saturated side (Feng & Tu 2021)."""
    pcs = torch.as_tensor(pcs, dtype=torch.long)
    keep = (pcs != 1) & ~flat.saturated_left & ~flat.saturated_right
    if int(keep.sum()) < 3:
        raise ValueError(f"psi_fit: only {int(keep.sum())} PCs are left after excluding PC1 and saturated sides; "
                         "analyse more PCs or raise the flatness cap")
    var = torch.as_tensor(variances, dtype=torch.float64)[pcs[keep] - 1]
    fit = power_law_fit(flat.widths[keep].numpy(), var.numpy())
    return PsiFit(-fit.exponent, fit, pcs[keep].tolist())


def _minibatches(n, batch_size, count, seed):
    """``count`` disjoint minibatches of a seeded shuffle (as one SGD epoch draws them): (count, B)."""
    if count * batch_size > n:
        raise ValueError(f"mlf_ensemble: {count} minibatches of {batch_size} need {count * batch_size} samples, "
                         f"the data has {n}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: count * batch_size].reshape(count, batch_size)


@dataclass
class MLFEnsemble:
    """Per minibatch mu and direction i: minimum theta*_i^mu and curvature M_ii^mu of L^mu along p_i;
    per direction: sigma~_i^2 = Var_mu(theta*) (unbiased), M_ii^(0) = <M_ii^mu>, noise strength
    (M_ii^(0))^2 sigma~_i^2. Minibatches whose curvature is not positive have no minimum: they are
    left out of sigma~ and counted in ``nonconvex``."""

    method: str
    theta_star: torch.Tensor  # (num_minibatches, D)
    curvature: torch.Tensor  # (num_minibatches, D)
    sigma_tilde2: torch.Tensor  # (D,)
    M0: torch.Tensor
    noise_strength: torch.Tensor
    nonconvex: torch.Tensor  # (D,) counts

    def to_dict(self):
        return {"method": self.method, "sigma_tilde2": self.sigma_tilde2.tolist(), "M0": self.M0.tolist(),
                "noise_strength": self.noise_strength.tolist(), "nonconvex": self.nonconvex.tolist(),
                "num_minibatches": self.theta_star.shape[0]}


def _parabola_fit_matrix(u):
    """(3, P): the least-squares (a, b, c) of a u^2 + b u + c through values at the points ``u`` in
    [-1, 1] are this matrix times the values. Applied as explicit products and sums (not MKL's lstsq
    or a BLAS product), so the fit is bit-for-bit the same wherever its inputs lie in memory and a
    resumed run reproduces the uninterrupted one."""
    design = torch.stack([u**2, u, torch.ones_like(u)], 1)
    return torch.linalg.solve(design.T @ design, design.T)


def mlf_ensemble(model, loss_fn, x, y, directions, batch_size, num_minibatches=100, seed=0, param="2.weight",
                 method="derivatives", halfwidth=1.0, points=7):
    """The MLF ensemble of Feng & Tu 2021. ``method`` "derivatives": theta* = -g^mu / M^mu from the first and second directional
    derivatives at w0 (per-sample forward-mode derivatives averaged over each minibatch); "parabola":
    a least-squares parabola through L^mu at ``points`` offsets in [-halfwidth, halfwidth] (a float or
    one per direction). ``directions``: (D, *param shape) unit vectors."""
    if method not in ("derivatives", "parabola"):
        raise ValueError(f"mlf_ensemble: method must be 'derivatives' or 'parabola', got {method!r}")
    batches = _minibatches(x.shape[0], batch_size, num_minibatches, seed)
    D = directions.shape[0]
    if method == "derivatives":
        flat = batches.reshape(-1)
        d1, d2 = per_sample_directional_derivatives(model, loss_fn, x[flat], y[flat], param, directions)
        g = d1.reshape(num_minibatches, batch_size, D).mean(1)
        M = d2.reshape(num_minibatches, batch_size, D).mean(1)
        theta = -g / M
    else:
        if points < 3:
            raise ValueError(f"mlf_ensemble: a parabola needs points >= 3, got {points}")
        h = torch.as_tensor(halfwidth, dtype=torch.float64).expand(D)
        unit = torch.linspace(-1, 1, points, dtype=torch.float64)
        fit = _parabola_fit_matrix(unit)
        theta, M = torch.empty(num_minibatches, D, dtype=torch.float64), torch.empty(num_minibatches, D, dtype=torch.float64)
        for d in range(D):  # one offset grid per direction (its own half-width)
            L = torch.stack([loss_profiles(model, loss_fn, (x[idx], y[idx]), directions[d : d + 1].reshape(1, -1),
                                           unit * h[d], params=[param])[0] for idx in batches])
            # L = a u^2 + b u + c at u = delta / h: curvature 2 a / h^2, minimum at -b h / (2 a)
            a, b = (sum(fit[row, j] * L[:, j] for j in range(points)) for row in (0, 1))
            theta[:, d], M[:, d] = -b * h[d] / (2 * a), 2 * a / h[d] ** 2
    convex = M > 0
    nonconvex = (~convex).sum(0)
    sigma = torch.stack([theta[convex[:, d], d].var() if int(convex[:, d].sum()) > 1 else torch.tensor(float("nan"),
                         dtype=torch.float64) for d in range(D)])
    M0 = M.mean(0)
    return MLFEnsemble(method, theta, M, sigma, M0, M0**2 * sigma, nonconvex)


def active_temperature(model, loss_fn, x, y, directions, lr, batch_size, offsets=(0.0,), param="2.weight",
                       sampling="without_replacement"):
    """The active temperature of Feng & Tu 2021: (D, G) T_i(delta) = (lr / 2) Var_mu[dL^mu(w + delta p_i)/d delta] for the unit
    ``directions`` p_i and ``offsets`` delta. The variance over minibatches of size B is exact from
    the per-sample derivatives s_p: Var(s) / B, times (N - B) / (N - 1) for minibatches drawn
    without replacement (an SGD epoch) or not for sampling with replacement."""
    if sampling not in SAMPLING:
        raise ValueError(f"active_temperature: sampling must be one of {SAMPLING}, got {sampling!r}")
    N = x.shape[0]
    if not 1 <= batch_size <= N:
        raise ValueError(f"active_temperature: batch_size must be in [1, {N}], got {batch_size}")
    factor = (N - batch_size) / (N - 1) if sampling == "without_replacement" and N > 1 else 1.0
    offsets = [float(o) for o in offsets]
    D = directions.shape[0]
    theta0 = dict(model.named_parameters())[param].detach()
    T = torch.empty(D, len(offsets), dtype=torch.float64)
    for g, delta in enumerate(offsets):
        if delta == 0.0:  # all directions in one call
            d1, _ = per_sample_directional_derivatives(model, loss_fn, x, y, param, directions, order=1)
            T[:, g] = d1.var(0, correction=0) / batch_size * factor * lr / 2
            continue
        for d in range(D):
            moved = _model_at(model, [param], (theta0 + delta * directions[d].reshape(theta0.shape)).reshape(-1))
            d1, _ = per_sample_directional_derivatives(moved, loss_fn, x, y, param, directions[d : d + 1], order=1)
            T[d, g] = float(d1.var(0, correction=0)[0]) / batch_size * factor * lr / 2
    return T
