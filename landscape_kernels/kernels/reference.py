"""Pure-torch reference of every op: the CPU/CUDA fallback when the extension is missing and the
oracle of the tests. Written for clarity from the definitions (docs/methods.md, docs/architecture.md): the
per-sample gradients G_b = sum_t D[b,t]^T A[b,t] are materialised for all samples but only for a slice
of output rows at a time, so memory stays bounded by ``_SLICE_ELEMENTS`` and each statistic is one pass.
"""
import torch

from .checks import (check_centre, check_cov_update, check_directions, check_layer_pair, check_profile, check_project,
                      check_reorth, check_weights)

_SLICE_ELEMENTS = 1 << 22


def _gradient_slices(A, D):
    """Yield (rows, G) with G (B, len(rows), in) the per-sample gradients restricted to output rows."""
    A3, D3 = (A.unsqueeze(1), D.unsqueeze(1)) if A.dim() == 2 else (A, D)
    B, _, n_in = A3.shape
    n_out = D3.shape[-1]
    step = max(1, _SLICE_ELEMENTS // (B * n_in))
    for start in range(0, n_out, step):
        rows = slice(start, min(n_out, start + step))
        yield rows, torch.einsum("bto,bti->boi", D3[..., rows], A3)


def per_sample_sq_norms(A, D):
    check_layer_pair(A, D, "per_sample_sq_norms")
    return sum(G.square().sum((1, 2)) for _, G in _gradient_slices(A, D))


def per_sample_gram(A, D):
    check_layer_pair(A, D, "per_sample_gram")
    return sum(G.flatten(1) @ G.flatten(1).T for _, G in _gradient_slices(A, D))


def per_sample_moments(A, D):
    """Mean and population variance (divided by B) over the batch of every gradient element; two
    passes in float64 so that float32 input keeps its accuracy when the mean dwarfs the spread, the
    second corrected by the mean deviation (Chan, Golub & LeVeque's corrected two-pass algorithm: the
    rounding of the mean does not bias the variance, and identical samples give 0)."""
    check_layer_pair(A, D, "per_sample_moments")
    mean = A.new_empty(D.shape[-1], A.shape[-1])
    var = torch.empty_like(mean)
    for rows, G in _gradient_slices(A.double(), D.double()):
        m = G.mean(0)
        mean[rows] = m
        deviation = G - m
        var[rows] = (deviation.square().mean(0) - deviation.mean(0).square()).clamp_min(0)
    return mean, var


def per_sample_project(A, D, V):
    _, _, n_in, n_out = check_layer_pair(A, D, "per_sample_project")
    check_directions(V, A, n_out, n_in, "per_sample_project")
    return sum(G.flatten(1) @ V[:, rows].flatten(1).T for rows, G in _gradient_slices(A, D))


def per_sample_cov_matvec(A, D, V):
    """C_1 V_k with C_1 = (1/B) sum_b (g_b - g_mean)(g_b - g_mean)^T."""
    B, _, n_in, n_out = check_layer_pair(A, D, "per_sample_cov_matvec")
    check_directions(V, A, n_out, n_in, "per_sample_cov_matvec")
    P = per_sample_project(A, D, V)
    return per_sample_weighted_sum(A, D, (P - P.mean(0)) / B)


def per_sample_weighted_sum(A, D, W):
    """(K, out, in) sums sum_b W[b, k] G_b."""
    B, _, n_in, n_out = check_layer_pair(A, D, "per_sample_weighted_sum")
    check_weights(W, A, B, "per_sample_weighted_sum")
    out = A.new_empty(W.shape[1], n_out, n_in)
    for rows, G in _gradient_slices(A, D):
        out[:, rows] = torch.einsum("bk,boi->koi", W, G)
    return out


def per_sample_stats(A, D):
    """(sq_norms, gram, mean, var) together."""
    check_layer_pair(A, D, "per_sample_stats")
    return (per_sample_sq_norms(A, D), per_sample_gram(A, D)) + per_sample_moments(A, D)


def per_sample_stats_about(A, D, M):
    """per_sample_stats with a centre M (out, in) for the variance pass: the same values (here exactly)."""
    _, _, n_in, n_out = check_layer_pair(A, D, "per_sample_stats_about")
    check_centre(M, A, n_out, n_in, "per_sample_stats_about")
    return per_sample_stats(A, D)


def lanczos_reorth(Q, W, j):
    """Classical Gram-Schmidt, applied twice, of each chain's new vectors W[c] (b, P) against the first
    j vectors of its basis Q[c] (m, P); returns the orthogonalised vectors and their norms (C, b)."""
    check_reorth(Q, W, j)
    w = W.clone()
    if j:
        q = Q[:, :j]
        for _ in range(2):
            w = w - (q @ w.transpose(1, 2)).transpose(1, 2) @ q
    return w, w.norm(dim=2)


def trajectory_cov_update(M2, mean, count, X):
    """Merge the snapshots X (T, N) into the float64 running statistics of ``count`` earlier ones, in
    place: mean (N,) and M2 (N, N) = sum of (x - mean)(x - mean)^T (Chan et al.'s parallel update)."""
    check_cov_update(M2, mean, count, X)
    Xd = X.double()
    T, n = X.shape[0], count + X.shape[0]
    chunk_mean = Xd.mean(0)
    d = chunk_mean - mean
    centred = Xd - chunk_mean
    scatter = centred.T @ centred
    M2.add_((scatter + scatter.T) / 2 + (count * T / n) * torch.outer(d, d))  # kept exactly symmetric
    mean.add_(d * (T / n))


def profile_ce_losses(z0, zd, direction, offset, weight, bias, target):
    """(M,) float64 summed cross-entropy over the rows of weight relu(z0 + offset[m] zd[direction[m]]) + bias,
    computed in float64 (the oracle of the compiled kernel)."""
    check_profile(z0, zd, direction, offset, weight, bias, target)
    h = torch.relu(z0.double()[None] + offset.double()[:, None, None] * zd.double()[direction])  # (M, R, H)
    logits = h @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    # per row (max - logit[target]) + log1p(the other terms of the softmax sum): one max term (exactly 1)
    # left out of the sum, so that a confidently right row keeps its small loss (logsumexp would round
    # max + log(1 + 1e-17) to max and give 0)
    top, where = logits.max(-1, keepdim=True)
    others = torch.exp(logits - top).scatter(-1, where, 0.0).sum(-1)
    picked = logits.gather(-1, target.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return ((top.squeeze(-1) - picked) + torch.log1p(others)).sum(1)


def trajectory_project(X, mean, basis):
    """(proj (T, k), residual (T,)), float64: proj = (X - mean) basis^T and the norm of what the basis
    leaves of each centred snapshot (basis rows taken as orthonormal)."""
    check_project(X, mean, basis)
    centred = X.double() - mean
    proj = centred @ basis.T
    return proj, (centred - proj @ basis).norm(dim=1)
