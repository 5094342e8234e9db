"""SGD on a loss with a continuous set of degenerate minima, and its effective landscape-dependent
regularisation (Yang, Tang & Tu, PRL 130, 237101, 2023); the derivation is in
``docs/reproductions/flat-valley.md``.

The model: N samples with per-sample losses l_i(w) = a_i (w1 w2 - b_i)^2 / 2, a_i > 0. A minibatch of
B samples (drawn with replacement) has the loss A (u - b_mu)^2 / 2 + const with u = w1 w2, A the mean
of its a_i and b_mu = sum a_i b_i / sum a_i: the paper's per-minibatch loss. The training loss is
minimal on the whole hyperbola u = b* = sum a_i b_i / sum a_i (the valley), where its Hessian has the
one non-zero eigenvalue lambda = a_bar (w1^2 + w2^2) = a_bar sqrt(D^2 + 4 b*^2), D = w1^2 - w2^2 being
the position along the valley; the flattest point is the balanced one, D = 0 (lambda_min = 2 a_bar |b*|).

One SGD step w -> w - lr g (w2, w1), g = A u - mean_batch(a_i b_i), changes D exactly by the factor
(1 - lr^2 g^2), so GD (g -> 0 on the valley) stays where it reached the valley and SGD drifts toward the
balanced point at the per-step rate

    r(S) = lr^2 sigma_v^2 / (1 - lr E[A^2] S / (2 a_bar)),    sigma_v^2 = Var_i(a_i (b* - b_i)) / B,

S = w1^2 + w2^2: the continuous-time (Fokker-Planck) drift lr^2 sigma_v^2, which is gradient descent on
the effective loss L + (lr / 4) sigma_v^2 S = L + lr sigma_v^2 lambda / (4 a_bar) along the valley,
times the discrete-step factor from the stationary transverse fluctuations (``drift_rate``).

``ValleySGD`` advances thousands of independent chains together (one tensor op per step for all of
them); ``batch_size=None`` is full-batch GD, the noiseless baseline.
"""
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass
class ValleyData:
    """Per-sample coefficients (a_i > 0, b_i) of the degenerate-valley model, float64 (N,) tensors."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self):
        a, b = torch.as_tensor(self.a, dtype=torch.float64), torch.as_tensor(self.b, dtype=torch.float64)
        if a.dim() != 1 or a.shape != b.shape or a.numel() < 2:
            raise ValueError(f"ValleyData: a and b must be (N,) tensors of the same length N >= 2, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("ValleyData: a or b has NaN or Inf entries")
        if not bool((a > 0).all()):
            raise ValueError("ValleyData: every a_i must be positive (the per-sample curvature)")
        self.a, self.b = a, b

    @property
    def size(self):
        return self.a.numel()

    @cached_property
    def a_mean(self):
        return float(self.a.mean())

    @cached_property
    def ab(self):
        """(N,) a_i b_i: a minibatch's mean of it is C_mu, the gradient coefficient's constant."""
        return self.a * self.b

    @cached_property
    def valley(self):
        """b* = sum a_i b_i / sum a_i: the valley is u = w1 w2 = b*."""
        return float(self.ab.sum() / self.a.sum())

    def min_sharpness(self):
        """lambda_min = 2 a_bar |b*|, the Hessian eigenvalue at the valley's balanced point."""
        return 2 * self.a_mean * abs(self.valley)

    def valley_variance(self, batch_size):
        """sigma_v^2: the variance over minibatches (B draws with replacement) of the gradient
        coefficient g = A u - mean(a_i b_i) on the valley; 0 for GD (``batch_size=None``)."""
        if batch_size is None:
            return 0.0
        return float(((self.a * (self.valley - self.b)) ** 2).mean()) / batch_size

    def a_second_moment(self, batch_size):
        """E[A^2] over minibatches of the mean curvature A (a_bar^2 for GD)."""
        extra = 0.0 if batch_size is None else float(self.a.var(unbiased=False)) / batch_size
        return self.a_mean ** 2 + extra

    def with_noise_scale(self, scale):
        """The same samples with every b_i - b* multiplied by ``scale`` (the same valley, the batch-to-batch
        variance of b_mu times scale^2)."""
        return ValleyData(self.a, self.valley + (self.b - self.valley) * float(scale))


def valley_dataset(num_samples=1000, valley=1.0, b_spread=1.0, a_spread=0.3, seed=0):
    """N samples with a_i log-normal of spread ``a_spread`` (normalised to mean 1) and b_i = valley +
    b_spread z_i, then shifted so that b* is exactly ``valley``."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"valley_dataset: num_samples must be an int >= 2, got {num_samples!r}")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.exp(a_spread * torch.randn(num_samples, generator=g, dtype=torch.float64))
    a = a / a.mean()
    b = valley + b_spread * torch.randn(num_samples, generator=g, dtype=torch.float64)
    b = b + (valley - (a * b).sum() / a.sum())
    return ValleyData(a, b)


# ---------------------------------------------------------------------------- closed forms
def loss(data, w):
    """(R,) training loss mean_i a_i (w1 w2 - b_i)^2 / 2 of (R, 2) points ``w``."""
    u = w[..., 0] * w[..., 1]
    return 0.5 * (data.a * (u[..., None] - data.b) ** 2).mean(-1)


def gradient(data, w):
    """(R, 2) training-loss gradient a_bar (u - b*) (w2, w1)."""
    u = w[..., 0] * w[..., 1]
    return (data.a_mean * (u - data.valley))[..., None] * w.flip(-1)


def hessian(data, w):
    """(R, 2, 2) training-loss Hessian a_bar [v v^T + (u - b*) [[0, 1], [1, 0]]], v = (w2, w1)."""
    u = w[..., 0] * w[..., 1]
    v = w.flip(-1)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=w.dtype)
    return data.a_mean * (v[..., :, None] * v[..., None, :] + (u - data.valley)[..., None, None] * swap)


def valley_position(w):
    """D = w1^2 - w2^2, the coordinate along the valley (conserved by gradient flow)."""
    return w[..., 0] ** 2 - w[..., 1] ** 2


def valley_sharpness(data, position):
    """lambda = a_bar sqrt(D^2 + 4 b*^2): the Hessian eigenvalue at the valley point of position D."""
    position = torch.as_tensor(position, dtype=torch.float64)
    return data.a_mean * torch.sqrt(position ** 2 + 4 * data.valley ** 2)


def valley_point(data, sharpness):
    """The (2,) point on the valley (w1 >= w2 > 0, b* > 0) whose Hessian eigenvalue is ``sharpness``."""
    b, lam_min = data.valley, data.min_sharpness()
    if b <= 0 or not sharpness >= lam_min:
        raise ValueError(f"valley_point: need b* > 0 and sharpness >= lambda_min = {lam_min:g}, got b* {b:g}, "
                         f"sharpness {sharpness!r}")
    S = sharpness / data.a_mean
    D = math.sqrt(max(S * S - 4 * b * b, 0.0))
    w1 = math.sqrt((S + D) / 2)
    return torch.tensor([w1, b / w1], dtype=torch.float64)


def effective_loss(data, w, lr, batch_size):
    """L + (lr / 4) E_mu |grad l_mu - grad L|^2: the training loss plus SGD's effective regularisation
    (Var_mu(g(u)) |grad u|^2 lr / 4, on the valley (lr sigma_v^2 / (4 a_bar)) lambda)."""
    u = w[..., 0] * w[..., 1]
    if batch_size is None:
        var = torch.zeros_like(u)
    else:
        coeff = data.a * (u[..., None] - data.b)  # per-sample gradient coefficients
        var = coeff.var(-1, unbiased=False) / batch_size
    return loss(data, w) + 0.25 * lr * var * (w ** 2).sum(-1)


# ---------------------------------------------------------------------------- the theory
def drift_rate(data, lr, batch_size, S):
    """Per-step relative rate r(S) at which SGD's valley position D shrinks (see the module docstring):
    E[Delta D] = -r D. The transverse fluctuations are stationary only while lr E[A^2] S < 2 a_bar;
    beyond that the rate is infinite (the valley point is unstable)."""
    S = np.asarray(S, dtype=np.float64)
    margin = 1 - lr * data.a_second_moment(batch_size) * S / (2 * data.a_mean)
    with np.errstate(divide="ignore"):
        return np.where(margin > 0, lr * lr * data.valley_variance(batch_size) / np.maximum(margin, 1e-300), np.inf)


def theory_path(data, lr, batch_size, start_position, steps):
    """(steps + 1,) mean valley position D_n of the theory from D_0 = ``start_position``:
    D_{n+1} = D_n (1 - r(S_n)), S_n = sqrt(D_n^2 + 4 b*^2)."""
    out = np.empty(steps + 1)
    D, b2 = float(start_position), 4 * data.valley ** 2
    out[0] = D
    for n in range(steps):
        D = D * (1 - float(drift_rate(data, lr, batch_size, math.sqrt(D * D + b2))))
        out[n + 1] = D
    return out


def first_below(path, level):
    """The first index at which |path| <= level (None if it never does)."""
    hit = np.flatnonzero(np.abs(np.asarray(path)) <= level)
    return int(hit[0]) if hit.size else None


def flat_position(data, tolerance=0.1):
    """|D| at which the valley sharpness is (1 + tolerance) lambda_min: 'flat' below it."""
    return 2 * abs(data.valley) * math.sqrt((1 + tolerance) ** 2 - 1)


def _origin_factors(C, lr):
    """E log|1 + lr C_mu| and E log|1 - lr C_mu| over the minibatch coefficients ``C``."""
    return float(torch.log((1 + lr * C).abs()).mean()), float(torch.log((1 - lr * C).abs()).mean())


def origin_exponents(data, lr, batch_size, samples=200_000, seed=0):
    """Lyapunov exponents E log|1 + lr C_mu| and E log|1 - lr C_mu| of the linearised SGD map at the
    saddle w = 0 (C_mu the minibatch mean of a_i b_i), along (1, 1) and (1, -1). Where both are negative
    the saddle attracts the chains (stochastic collapse): training fails. Monte Carlo over minibatches."""
    g = torch.Generator().manual_seed(int(seed))
    if batch_size is None:
        C = data.ab.mean().reshape(1)
    else:
        C = data.ab[torch.randint(data.size, (samples, batch_size), generator=g)].mean(1)
    return _origin_factors(C, lr)


def collapse_bound(data, lr, batch_size, low=1e-3, high=1e3, samples=200_000, seed=0):
    """The noise scale s (``ValleyData.with_noise_scale``) above which the saddle at w = 0 attracts SGD:
    where the larger of ``origin_exponents`` crosses zero (the same random minibatches at every s,
    bisection in log s); None for GD or if it does not turn negative in [low, high]."""
    if batch_size is None:
        return None
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(data.size, (samples, batch_size), generator=g)
    centre = (data.a[idx] * data.valley).mean(1)  # C_mu at s = 0
    spread = (data.a * (data.b - data.valley))[idx].mean(1)  # what s multiplies

    def exponent(scale):
        return max(_origin_factors(centre + scale * spread, lr))

    grid = np.geomspace(low, high, 61)  # the exponent turns negative, and positive again for huge s
    below = [k for k, s in enumerate(grid) if exponent(s) < 0]
    if not below or below[0] == 0:
        return None
    lo, hi = math.log(grid[below[0] - 1]), math.log(grid[below[0]])
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if exponent(math.exp(mid)) > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


# ---------------------------------------------------------------------------- the chains
class ValleySGD:
    """``num_chains`` independent SGD chains on the valley model, advanced together.

    Args:
        data: the ``ValleyData``.
        lr: the learning rate.
        batch_size: minibatch size B (samples drawn with replacement per chain and step), or None for
            full-batch GD.
        start: (2,) or (num_chains, 2) starting points.
        num_chains: chains (they share the start when it is (2,)).
        seed: seeds the minibatch draws.
        blowup: a chain whose |w|^2 exceeds this is marked diverged and frozen (NaN).
    """

    def __init__(self, data, lr, batch_size, start, num_chains=1, seed=0, blowup=1e8):
        if not float(lr) > 0:
            raise ValueError(f"ValleySGD: lr must be positive, got {lr!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"ValleySGD: batch_size must be a positive int or None (GD), got {batch_size!r}")
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"ValleySGD: num_chains must be a positive int, got {num_chains!r}")
        start = torch.as_tensor(start, dtype=torch.float64)
        if start.shape not in ((2,), (num_chains, 2)) or not bool(torch.isfinite(start).all()):
            raise ValueError(f"ValleySGD: start must be finite, (2,) or ({num_chains}, 2), got {tuple(start.shape)}")
        self.data, self.lr, self.batch_size = data, float(lr), batch_size
        self.w = start.expand(num_chains, 2).clone()
        self.gen = torch.Generator().manual_seed(int(seed))
        self.blowup = float(blowup)
        self.diverged = torch.zeros(num_chains, dtype=torch.bool)
        self.steps = 0

    def coefficients(self):
        """(A, mean a_i b_i) of this step's minibatch per chain (the full means for GD)."""
        if self.batch_size is None:
            R = self.w.shape[0]
            return (torch.full((R,), self.data.a_mean, dtype=torch.float64),
                    torch.full((R,), float(self.data.ab.mean()), dtype=torch.float64))
        idx = torch.randint(self.data.size, (self.w.shape[0], self.batch_size), generator=self.gen)
        return self.data.a[idx].mean(1), self.data.ab[idx].mean(1)

    def step(self):
        A, C = self.coefficients()
        u = self.w[:, 0] * self.w[:, 1]
        self.w = self.w - self.lr * (A * u - C)[:, None] * self.w.flip(1)
        bad = ~self.diverged & ~((self.w ** 2).sum(1) <= self.blowup)  # NaN counts as diverged
        if bool(bad.any()):
            self.diverged |= bad
            self.w[bad] = float("nan")
        self.steps += 1

    def run(self, steps, record_every=1, record=None):
        """Advance ``steps`` steps; every ``record_every`` steps (and at the start) call
        ``record(self)`` and collect what it returns (default: the (R, 2) points)."""
        record = record or (lambda s: s.w.clone())
        out = [record(self)]
        for n in range(1, steps + 1):
            self.step()
            if n % record_every == 0:
                out.append(record(self))
        return out
