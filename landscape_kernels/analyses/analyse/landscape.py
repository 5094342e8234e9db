"""The landscape pictures of ``analyse``: 1-D loss profiles along the top Hessian eigenvectors and along
filter-normalised random directions (Li et al. 2018, "Visualizing the loss landscape of neural nets"),
and a 2-D surface over two of them, all through the batched loss-profile engine (``loss_profiles``:
many points per pass over the data).

- Eigen-direction profiles: unit eigenvectors v_i, offsets |delta| <= r with r = sqrt(2 rise / lambda_1),
  where the quadratic model L0 + delta g.v_1 + lambda_1 delta^2 / 2 of the sharpest direction has risen
  by ``profile_rise`` (capped at the weights' norm); the flatter directions share the axis. Each
  profile's curvature at 0 by the central second difference is reported beside lambda_i.
- Filter-normalised random directions: a Gaussian direction whose every filter (a row of a Linear
  weight, an output channel of a convolution, a row of an embedding: index 0 of a tensor of 2 or more
  dimensions) is scaled to the norm of the same filter of the weights; 1-D parameters (biases and
  norms) stay fixed, as Li et al.'s figures do. Offsets in [-1, 1].

Which way evaluates the points faster depends on the model: the batched engine wins where one
forward of many stacked weights beats many plain forwards (small per-sample work), a plain loop where
each forward is already one efficient GEMM per layer. ``landscape_method="auto"`` times both on the
stage's first points and keeps the faster, the same choice on every rank.
"""
import math
import time

import numpy as np
import torch


SURFACE_CHUNK_ELEMENTS = 1 << 24  # direction numbers per loss_profiles call of the surface (64 MB in float32)


def filter_normalised_directions(problem, count, seed):
    """(count, P) filter-normalised random directions over the chosen parameters."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        parts = []
        for p in problem.params:
            w = p.detach().double().cpu()
            if w.dim() < 2:
                parts.append(torch.zeros(w.numel(), dtype=torch.float64))
                continue
            d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            flat_w, flat_d = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)
            scale = flat_w.norm(dim=1, keepdim=True) / flat_d.norm(dim=1, keepdim=True).clamp_min(1e-300)
            parts.append((flat_d * scale).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows) if rows else torch.zeros(0, problem.num_params, dtype=torch.float64)


class PointLosses:
    """(K, G) mean losses at theta0 + deltas[g] directions[k], by ``method``: "batched", "loop", or
    "auto", which times both ways on the first points (an eighth of the first call's directions each,
    or one call each when a call holds one direction) and keeps the faster for the rest.
    ``seconds_per_point`` holds what auto measured."""

    METHODS = ("batched", "loop")

    def __init__(self, problem, method):
        self.problem, self.method, self.seconds_per_point = problem, method, {}

    def _run(self, method, directions, deltas):
        if method == "batched":
            return self.problem.mean_losses(directions, deltas)
        return self.problem.mean_losses_one_by_one(directions, deltas)

    def _timed(self, method, directions, deltas):
        t0 = time.perf_counter()
        out = self._run(method, directions, deltas)
        self.seconds_per_point[method] = (time.perf_counter() - t0) / (len(directions) * len(deltas))
        return out

    def __call__(self, directions, deltas):
        if self.method != "auto":
            return self._run(self.method, directions, deltas)
        untimed = [m for m in self.METHODS if m not in self.seconds_per_point]
        if len(untimed) == 2 and len(directions) >= 2:
            # an eighth of the call's directions (at least one, at most half) each way, the rest the faster way
            m = max(1, min(len(directions) // 2, math.ceil(len(directions) / 8)))
            parts = [self._timed("batched", directions[:m], deltas), self._timed("loop", directions[m : 2 * m], deltas)]
            self._choose()
            if len(directions) > 2 * m:
                parts.append(self._run(self.method, directions[2 * m :], deltas))
            return np.concatenate(parts)
        out = self._timed(untimed[0], directions, deltas)
        if len(self.seconds_per_point) == 2:
            self._choose()
        return out

    def _choose(self):
        # the slowest rank's times: every rank makes the same choice (and so the same collectives)
        seconds = self.problem.ranks.table([self.seconds_per_point[m] for m in self.METHODS]).max(0).values.tolist()
        self.seconds_per_point = dict(zip(self.METHODS, seconds))
        self.method = self.METHODS[int(seconds[1] < seconds[0])]

    def summary(self):
        """The method the points used (auto's choice; "batched" when a stage had too few points to time
        both) and what auto measured."""
        method = "batched" if self.method == "auto" else self.method
        return {"method": method, "seconds_per_point": self.seconds_per_point or None}


def eigen_range(problem, results):
    """r: the offset where the sharpest direction's quadratic model has risen by ``profile_rise``."""
    lam = results["hessian"]["eigenvalues"][0]
    weight_norm = float(problem.flat_parameters().double().norm())
    r = math.sqrt(2 * problem.settings.profile_rise / lam) if lam > 0 else weight_norm
    return min(r, max(weight_norm, 1e-12))


def profiles_stage(problem, results, arrays):
    s = problem.settings
    V = arrays["hessian_eigenvectors"]
    r = eigen_range(problem, results)
    eigen_deltas = np.linspace(-r, r, s.profile_points)
    random_deltas = np.linspace(-1.0, 1.0, s.profile_points)
    R = filter_normalised_directions(problem, s.random_directions, s.seed).numpy()
    losses = PointLosses(problem, s.landscape_method)
    with problem.bar(len(V) + len(R), "profiles", unit="direction") as bar:
        eigen = losses(V, eigen_deltas)
        bar.update(len(V))
        rand = losses(R, random_deltas) if len(R) else np.zeros((0, s.profile_points))
        bar.update(len(R))
    centre = s.profile_points // 2  # the odd grids hold delta = 0 at the centre; even ones do not
    result = {"eigen_range": r, "loss": problem.loss,
              "eigen_curvature": _second_differences(eigen, eigen_deltas).tolist(),
              "eigenvalues": results["hessian"]["eigenvalues"][: len(V)],
              "random_rise": (rand[:, [0, -1]].mean(1) - problem.loss).tolist() if len(R) else [],
              "random_curvature": _second_differences(rand, random_deltas).tolist() if len(R) else [],
              "centre_loss": float(eigen[0, centre]) if s.profile_points % 2 else None, **losses.summary()}
    return result, {"eigen_deltas": eigen_deltas, "eigen_profiles": eigen, "random_deltas": random_deltas,
                    "random_profiles": rand, "random_directions": R}


def _second_differences(profiles, deltas):
    """Curvature at the centre from the three points nearest delta = 0, per profile."""
    i = int(np.argmin(np.abs(deltas)))
    i = min(max(i, 1), len(deltas) - 2)
    h1, h2 = deltas[i] - deltas[i - 1], deltas[i + 1] - deltas[i]
    left, mid, right = profiles[:, i - 1], profiles[:, i], profiles[:, i + 1]
    return 2 * (h1 * right - (h1 + h2) * mid + h2 * left) / (h1 * h2 * (h1 + h2))


def surface_stage(problem, results, arrays):
    """The mean loss on an n x n grid of L(theta0 + a u + b v): every row of the grid is one batch of
    directions a_i u + b_j v at offset 1 for the loss-profile engine."""
    s = problem.settings
    n = s.surface_points
    if s.surface_directions == "hessian":
        V = arrays["hessian_eigenvectors"]
        if len(V) < 2:
            raise ValueError("analyse: surface_directions='hessian' needs top_k >= 2")
        U = V[:2]
        r = eigen_range(problem, results)
        axis = np.linspace(-r, r, n)
    else:
        U = arrays.get("random_directions")
        if U is None or len(U) < 2:
            U = filter_normalised_directions(problem, 2, s.seed).numpy()
        U, axis = U[:2], np.linspace(-1.0, 1.0, n)
    per_call = max(1, SURFACE_CHUNK_ELEMENTS // max(problem.num_params, 1))
    points = [(a, b) for a in axis for b in axis]
    losses, evaluate = [], PointLosses(problem, s.landscape_method)
    with problem.bar(n * n, "surface", unit="point") as bar:
        for start in range(0, len(points), per_call):
            chunk = np.array(points[start : start + per_call])
            D = chunk[:, :1] * U[0][None, :] + chunk[:, 1:] * U[1][None, :]
            losses.append(evaluate(D, [1.0])[:, 0])
            bar.update(len(chunk))
    grid = np.concatenate(losses).reshape(n, n)  # grid[i, j] = L(theta0 + axis[i] u + axis[j] v)
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    result = {"directions": s.surface_directions, "points": n, "axis_range": float(axis[-1]), "loss": problem.loss,
              "min": float(grid.min()), "argmin": [float(axis[i]), float(axis[j])], "max": float(grid.max()),
              **evaluate.summary()}
    return result, {"surface_axis": axis, "surface": grid}
