"""The gradient-noise stage of ``analyse``: per-sample gradient norms, the gradient noise scale and the
critical batch size it implies, per-layer signal-to-noise, and the top of the noise spectrum.

Everything comes from the fused per-sample kernels over the factors one forward and backward per batch
records (``NoiseCovarianceOperator``), never from a samples x parameters matrix:

- s_n = ||g_n||^2 per sample, p_n = <g_n, gbar> with gbar the mean gradient;
- unbiased |G|^2 = (N^2 |gbar|^2 - S) / (N (N - 1)) and tr(Sigma) = (S - N |gbar|^2) / (N - 1), S = sum s_n;
- B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An empirical model of large-batch training",
  eq. 2.8), the batch size at which the gradient noise equals the signal; the critical batch size is
  about B_simple where the Hessian is well conditioned (their section 2.3);
- its standard error by the leave-one-out jackknife, exact from (s_n, p_n): without sample n,
  |gbar_-n|^2 = (N^2 |gbar|^2 - 2 N p_n + s_n) / (N - 1)^2;
- per layer: |G_l|^2 / tr(Sigma_l), the per-sample signal-to-noise (a batch of B has B times it).
"""
import math

import numpy as np
import torch

from ...linalg.lanczos import lanczos_eigs
from .problem import parameter_groups

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def noise_scale(s, mean_sq):
    """(|G|^2, tr Sigma, B_simple), unbiased, from the per-sample squared norms ``s`` (float64 array) and
    |gbar|^2; B_simple is inf when |G|^2 <= 0 (the noise hides the signal at this sample size)."""
    N, S = s.size, s.sum()
    signal = (N * N * mean_sq - S) / (N * (N - 1))
    trace = (S - N * mean_sq) / (N - 1)
    return signal, trace, (trace / signal if signal > 0 else math.inf)


def jackknife_noise_scale(s, p, mean_sq):
    """The leave-one-out jackknife standard error of B_simple, exact from the per-sample squared norms
    ``s``, the projections ``p`` on the mean gradient and |gbar|^2 (NaN under 3 samples, inf when a
    leave-one-out signal is not positive)."""
    N = s.size
    if N < 3:
        return math.nan
    M = N - 1
    loo_mean_sq = (N * N * mean_sq - 2 * N * p + s) / (M * M)
    S = s.sum() - s
    signal = (M * M * loo_mean_sq - S) / (M * (M - 1))
    trace = (S - M * loo_mean_sq) / (M - 1)
    if np.any(signal <= 0):
        return math.inf
    values = trace / signal
    return float(math.sqrt(M / N * np.sum((values - values.mean()) ** 2)))


def noise_stage(problem, results, arrays):
    C = problem.noise()
    N = problem.num_samples
    if N < 2:
        raise ValueError("analyse: the noise stage needs at least 2 samples (a covariance over samples)")
    gbar = problem.mean_gradient()
    parts = problem.split(gbar)
    sq, proj = [], []
    # per parameter: sum over batches of n_i (variance_i + |mean_i - gbar|^2) = N tr(Sigma_param)
    spread = {n: 0.0 for n in problem.param_names}
    for ps in problem.noise_factors():
        stats = ps.stats()  # norms, mean and variance in one pass over each layer's factors
        sq.append(stats["sq_norms"].double().cpu())
        proj.append(ps.project({n: parts[n].unsqueeze(0) for n in ps.param_names})[:, 0].double().cpu())
        B = ps.batch_size
        means, variances = stats["mean"], stats["variance"]
        for n in ps.param_names:
            spread[n] += B * (float(variances[n].double().sum()) + float((means[n] - parts[n]).double().pow(2).sum()))
    # every rank's samples in rank order, and the spreads summed over the ranks
    ranks = problem.ranks
    s = ranks.gather_rows(torch.cat(sq), problem.shard_sizes).numpy()
    p = ranks.gather_rows(torch.cat(proj), problem.shard_sizes).numpy()
    spread = dict(zip(spread, ranks.sum(torch.tensor(list(spread.values()), dtype=torch.float64)).tolist()))
    mean_sq = float(gbar.double().pow(2).sum())
    signal, trace, b_simple = noise_scale(s, mean_sq)
    norms = np.sqrt(np.maximum(s, 0))
    layers = []
    for layer, names in parameter_groups(problem.param_names):
        g2 = sum(float(parts[n].double().pow(2).sum()) for n in names)
        t = sum(spread[n] for n in names) / N
        layers.append({"layer": layer, "gradient_sq_norm": g2, "noise_trace": t, "snr": g2 / t if t > 0 else math.inf})
    k = min(problem.settings.top_k, problem.num_params)
    with problem.bar(20 * k, "noise spectrum") as bar:
        r = lanczos_eigs(problem.tracked(C, bar), k=k, tol=problem.settings.tol, seed=problem.settings.seed)
    population_trace = float(s.mean() - mean_sq)
    result = {
        "samples": N, "gradient_sq_norm": mean_sq, "signal_sq_norm": signal, "noise_trace": trace,
        "b_simple": b_simple, "b_simple_stderr": jackknife_noise_scale(s, p, mean_sq),
        "norm_mean": float(norms.mean()), "norm_quantiles": dict(zip(map(str, QUANTILES), np.quantile(norms, QUANTILES).tolist())),
        "layers": layers,
        "spectrum": {"eigenvalues": r.eigenvalues.tolist(), "residuals": r.residuals.tolist(), "converged": bool(r.converged),
                     "top_share": float(r.eigenvalues.clamp_min(0).sum()) / population_trace if population_trace > 0 else math.nan,
                     "num_products": r.num_products},
    }
    return result, {"gradient_norms": norms, "noise_eigenvectors": r.eigenvectors.T.detach().double().cpu().numpy()}
