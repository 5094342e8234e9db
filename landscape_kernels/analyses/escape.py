"""SGD on linear regression and the power-law escape of Mori et al. 2022.

For ell_mu = (theta . x_mu - y_mu)^2 / 2 the training loss is exactly quadratic,
L(theta) = L* + (theta - theta*)^T H (theta - theta*) / 2 with H = X^T X / N, and SGD's noise is
proportional to L (the decoupling of Mori et al. 2022 holds up to the x-y correlations). Theory: the
stationary distribution is P(theta) ~ L(theta)^-phi with phi = 1 + B / (lr h*), and the mean first
passage time to L = c L* grows as c^(B / (lr h*) + 1 - d / 2) for large c (``passage_time_theory`` is
that SDE's mean passage time at any c, exactly).

``LinearRegressionSGD`` runs many independent SGD chains at once (one tensor op per step for all of
them); ``fit_stationary_exponent`` is the maximum-likelihood phi of P ~ L^-phi, which has a closed-form
normaliser; ``first_passage`` records, per chain and threshold, the first step above c L*.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from .fits import power_law_fit


def gaussian_regression_data(num_samples, dim, seed=0, dtype=torch.float64):
    """Mori et al. 2022: x ~ N(0, I_d) and y ~ N(0, 1) drawn independently, (num_samples, dim) and (num_samples,)."""
    if not isinstance(num_samples, int) or num_samples < 2 or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"gaussian_regression_data: need num_samples >= 2 and dim >= 1 ints, got {num_samples!r}, {dim!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_samples, dim, generator=g, dtype=dtype), torch.randn(num_samples, generator=g, dtype=dtype)


def stationary_exponent_theory(batch_size, lr, h):
    """phi = 1 + B / (lr h*) (Mori et al. 2022)."""
    return 1.0 + batch_size / (lr * h)


def passage_slope_theory(batch_size, lr, h, dim):
    """d log t_p / d log c = B / (lr h*) + 1 - d / 2 (Mori et al. 2022)."""
    return batch_size / (lr * h) + 1.0 - dim / 2.0


def passage_time_theory(thresholds, batch_size, lr, h, dim):
    """Mean first-passage time (in units of lr x steps) from theta* to L = c L* of the SDE behind the
    theory (Mori et al. 2022: decoupled noise Sigma = 2 L H / B, isotropic H = h I in ``dim`` dimensions),
    exactly, for each factor c in ``thresholds``.

    Its slope in log c tends to B / (lr h) + 1 - d / 2 only for large c; at c of order 1, where
    simulations can reach, it is smaller (about 10.1, 8.8 and 7.8 for d = 1, 2, 3 at c in [1.1, 1.6],
    B = 1, lr = 0.1, h = 1, against 10.5, 10 and 9.5). With u^2 = h |theta - theta*|^2 / (2 L*) the
    radial diffusion's scale and speed densities give (L* drops out)

        T(c) = 2B / (lr h^2) * int_0^sqrt(c-1) u^(1-d) (1+u^2)^(phi-1) G(u) du,
        G(u) = int_0^u z^(d-1) (1+z^2)^-phi dz = B(d/2, phi-d/2) I_{u^2/(1+u^2)}(d/2, phi-d/2) / 2,

    phi = 1 + B / (lr h). It needs phi > d/2 (the paper's stability condition n < 2 phi).
    """
    from scipy import integrate, special

    c = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.all(c > 1) or not np.all(np.isfinite(c)):
        raise ValueError(f"passage_time_theory: thresholds must be finite factors c > 1 of L*, got {thresholds!r}")
    if not (batch_size > 0 and lr > 0 and h > 0) or int(dim) != dim or dim < 1:
        raise ValueError(f"passage_time_theory: need batch_size, lr, h > 0 and an integer dim >= 1, got "
                         f"{batch_size!r}, {lr!r}, {h!r}, {dim!r}")
    phi, a = 1.0 + batch_size / (lr * h), dim / 2.0
    if phi <= a:
        raise ValueError(f"passage_time_theory: phi = {phi:g} <= d/2 = {a:g}: SGD has no stationary state (Mori et al. 2022)")
    half_beta = 0.5 * special.beta(a, phi - a)

    def integrand(u):
        inner = half_beta * special.betainc(a, phi - a, u * u / (1 + u * u))
        return u ** (1 - dim) * (1 + u * u) ** (phi - 1) * inner

    order = np.argsort(c)
    edges = np.concatenate([[0.0], np.sqrt(c[order] - 1)])
    pieces = [integrate.quad(integrand, lo, hi, limit=200, epsabs=0, epsrel=1e-10)[0] for lo, hi in zip(edges[:-1], edges[1:])]
    times = np.empty_like(c)
    times[order] = np.cumsum(pieces) * 2 * batch_size / (lr * h * h)
    return times


class LinearRegressionSGD:
    """``num_runs`` independent SGD chains on the least-squares loss of (x, y), advanced together.

    Args:
        x, y: (N, d) inputs and (N,) targets.
        lr, batch_size: SGD settings; each step draws B samples per chain without replacement
            (a random permutation prefix per chain; with replacement for B = 1, which is the same).
        num_runs: chains; they start at ``theta0`` ((d,) or (num_runs, d); default theta*).
        seed: seeds the minibatch draws.
    """

    def __init__(self, x, y, lr, batch_size, num_runs=1, theta0=None, seed=0):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            raise ValueError(f"LinearRegressionSGD: x must be (N, d) and y (N,), got {getattr(x, 'shape', x)} and "
                             f"{getattr(y, 'shape', y)}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("LinearRegressionSGD: x or y has NaN or Inf entries")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= x.shape[0]:
            raise ValueError(f"LinearRegressionSGD: batch_size must be an int in [1, {x.shape[0]}], got {batch_size!r}")
        if not float(lr) > 0:
            raise ValueError(f"LinearRegressionSGD: lr must be positive, got {lr!r}")
        if not isinstance(num_runs, int) or num_runs < 1:
            raise ValueError(f"LinearRegressionSGD: num_runs must be a positive int, got {num_runs!r}")
        self.x, self.y = x.double(), y.double()
        self.lr, self.batch_size, self.num_runs = float(lr), batch_size, num_runs
        N, d = x.shape
        self.hessian = self.x.T @ self.x / N
        self.theta_star = torch.linalg.solve(self.hessian, self.x.T @ self.y / N)
        self.loss_star = float(0.5 * ((self.x @ self.theta_star - self.y) ** 2).mean())
        theta = self.theta_star if theta0 is None else torch.as_tensor(theta0, dtype=torch.float64)
        self.theta = theta.expand(num_runs, d).clone()
        self.gen = torch.Generator().manual_seed(int(seed))
        self.step_count = 0

    def loss(self, theta=None):
        """(R,) exact training losses L* + u^T H u / 2, u = theta - theta*."""
        u = (self.theta if theta is None else theta) - self.theta_star
        return self.loss_star + 0.5 * ((u @ self.hessian) * u).sum(-1)

    def _indices(self, steps):
        N, R, B = self.x.shape[0], self.num_runs, self.batch_size
        if B == 1 or B * B < N // 100:  # collisions are negligible: draw with replacement, fix repeats below
            idx = torch.randint(N, (steps, R, B), generator=self.gen)
            if B > 1:
                dup = (idx.sort(-1).values.diff(dim=-1) == 0).any(-1)
                for s, r in dup.nonzero().tolist():  # rare: redraw that minibatch without replacement
                    idx[s, r] = torch.randperm(N, generator=self.gen)[:B]
            return idx
        return torch.stack([torch.stack([torch.randperm(N, generator=self.gen)[:B] for _ in range(R)])
                            for _ in range(steps)])

    def run(self, steps, chunk=1000, on_step=None):
        """Advance every chain ``steps`` steps; ``on_step(step, theta)`` (optional) is called after each."""
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            idx = self._indices(n)
            xb, yb = self.x[idx], self.y[idx]  # (n, R, B, d), (n, R, B)
            for s in range(n):
                r = (xb[s] @ self.theta[:, :, None]).squeeze(-1) - yb[s]  # (R, B) residuals
                self.theta -= (self.lr / self.batch_size) * (r[:, :, None] * xb[s]).sum(1)
                self.step_count += 1
                if on_step is not None:
                    on_step(self.step_count, self.theta)
            done += n
        return self.theta

    def sample(self, num_samples, every=100, burn_in=1000):
        """(num_samples, R, d) states every ``every`` steps after ``burn_in`` steps."""
        if not isinstance(every, int) or every < 1 or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"sample: num_samples and every must be positive ints, got {num_samples!r}, {every!r}")
        self.run(burn_in)
        out = torch.empty(num_samples, self.num_runs, self.theta.shape[1], dtype=torch.float64)
        for i in range(num_samples):
            self.run(every)
            out[i] = self.theta
        return out

    def first_passage(self, thresholds, max_steps, chunk=1000):
        """(R, K) first step at which L > c_k L* per chain (NaN where not reached in ``max_steps``);
        chains are not reset, so call it on chains started at theta*."""
        c = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
        if c.numel() == 0 or not bool((c > 1).all()):
            raise ValueError(f"first_passage: thresholds must be factors c > 1 of L*, got {thresholds!r}")
        levels = c * self.loss_star
        first = torch.full((self.num_runs, c.numel()), float("nan"), dtype=torch.float64)
        start = self.step_count

        def on_step(step, theta):
            above = (self.loss(theta)[:, None] > levels) & first.isnan()
            if above.any():
                first[above] = float(step - start)

        while self.step_count - start < max_steps and bool(first.isnan().any()):
            self.run(min(chunk, max_steps - (self.step_count - start)), chunk=chunk, on_step=on_step)
        return first


@dataclass
class StationaryFit:
    """Maximum-likelihood phi of P(theta) ~ L(theta)^-phi with its standard error (for independent
    samples; chain samples are correlated, so treat it as a lower bound) and the sample count."""

    phi: float
    stderr: float
    num_samples: int


def fit_stationary_exponent(losses, loss_star, dim):
    """MLE of phi from losses L(theta_k) of samples theta_k in d = ``dim`` dimensions, given the
    minimum L*: with a = L*, P(theta) = (L* + u^T H u / 2)^-phi / Z and
    Z = det(H)^-1/2 (2 pi a)^(d/2) a^-phi Gamma(phi - d/2) / Gamma(phi), so the likelihood equation is
    digamma(phi) - digamma(phi - d/2) = mean log(L_k / L*)."""
    from scipy.optimize import brentq
    from scipy.special import digamma, polygamma

    L = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    if L.numel() < 2 or not bool(torch.isfinite(L).all()):
        raise ValueError("fit_stationary_exponent: need at least 2 finite losses")
    if not float(loss_star) > 0 or not bool((L >= loss_star * (1 - 1e-12)).all()):
        raise ValueError(f"fit_stationary_exponent: loss_star must be positive and <= every loss, got {loss_star!r}")
    m = float(torch.log(L.clamp_min(loss_star) / loss_star).mean())
    if m <= 0:
        raise ValueError("fit_stationary_exponent: every sample sits at the minimum; phi is unbounded")
    half = dim / 2.0

    def equation(phi):
        return digamma(phi) - digamma(phi - half) - m  # falls from +inf (phi -> d/2) to -m (phi -> inf)

    lo, hi = half + 1e-9, half + 1.0
    while equation(hi) > 0:
        hi = half + 2 * (hi - half)
        if hi > 1e9:
            raise ValueError("fit_stationary_exponent: no finite maximum (samples too concentrated)")
    phi = brentq(equation, lo, hi, xtol=1e-12, rtol=1e-12)
    info = float(polygamma(1, phi - half) - polygamma(1, phi))
    return StationaryFit(float(phi), 1.0 / math.sqrt(L.numel() * info), int(L.numel()))


def sample_stationary(phi, hessian, loss_star, num_samples, seed=0):
    """Exact samples u = theta - theta* of P ~ (L* + u^T H u / 2)^-phi (a multivariate Student t with
    nu = 2 phi - d degrees of freedom), for testing the fit."""
    H = torch.as_tensor(hessian, dtype=torch.float64)
    d = H.shape[0]
    nu = 2 * phi - d
    if nu <= 0:
        raise ValueError(f"sample_stationary: phi must exceed d / 2 = {d / 2}, got {phi!r}")
    rng = np.random.default_rng(int(seed))
    z = torch.from_numpy(rng.standard_normal((num_samples, d)))
    w = torch.from_numpy(rng.chisquare(nu, num_samples))
    t = z / torch.sqrt(w / nu)[:, None]
    evals, evecs = torch.linalg.eigh(H)
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return math.sqrt(2 * loss_star / nu) * t @ inv_sqrt


def passage_slope(thresholds, mean_times):
    """OLS slope of log t_p on log c with its 95 % interval (``fits.power_law_fit``)."""
    return power_law_fit(thresholds, mean_times)
