"""Least-squares power-law fits with their uncertainty."""
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass
class PowerLawFit:
    """y ~ A x^exponent fitted by least squares of log y on log x over ``n`` points with x in
    [x_min, x_max]; ``stderr`` is the standard error of the exponent and ``ci95`` its 95 % confidence
    interval (Student t with n - 2 degrees of freedom)."""

    exponent: float
    stderr: float
    ci95: tuple
    log_prefactor: float
    n: int
    x_min: float
    x_max: float
    r2: float

    def to_dict(self):
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d

    def predict(self, x):
        return np.exp(self.log_prefactor) * np.asarray(x, dtype=np.float64) ** self.exponent


def power_law_fit(x, y):
    """Fit y ~ A x^exponent to positive (x, y) pairs (at least 3; non-positive or non-finite pairs are
    an error, not silently dropped: choose the range before calling)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power_law_fit: x and y differ in length: {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"power_law_fit: needs at least 3 points, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("power_law_fit: x and y must be positive and finite")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        raise ValueError("power_law_fit: all x are equal; no exponent can be fitted")
    res = stats.linregress(lx, ly)
    n = x.size
    half = stats.t.ppf(0.975, n - 2) * res.stderr if n > 2 else math.inf
    return PowerLawFit(float(res.slope), float(res.stderr), (float(res.slope - half), float(res.slope + half)),
                       float(res.intercept), int(n), float(x.min()), float(x.max()), float(res.rvalue ** 2))
