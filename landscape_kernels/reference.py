"""Pure-torch reference of every op: the CPU/CUDA fallback when the extension is missing and the
oracle of the tests. Written for clarity from the definitions (SPEC conventions, DESIGN §2.1): the
per-sample gradients G_b = sum_t D[b,t]^T A[b,t] are materialised, but only a chunk of samples at a
time, so memory stays bounded by ``_CHUNK_ELEMENTS``.
"""
import torch

from ._checks import check_directions, check_layer_pair, check_weights

_CHUNK_ELEMENTS = 1 << 22


def _as_sequences(A, D):
    return (A.unsqueeze(1), D.unsqueeze(1)) if A.dim() == 2 else (A, D)


def _gradient_chunks(A, D):
    """Yield (start, G) with G (n, out, in) the per-sample gradients of samples start..start+n."""
    A3, D3 = _as_sequences(A, D)
    B, _, n_in = A3.shape
    n_out = D3.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // (n_in * n_out))
    for start in range(0, B, chunk):
        yield start, torch.einsum("bto,bti->boi", D3[start : start + chunk], A3[start : start + chunk])


def per_sample_sq_norms(A, D):
    check_layer_pair(A, D, "per_sample_sq_norms")
    return torch.cat([G.square().sum((1, 2)) for _, G in _gradient_chunks(A, D)])


def per_sample_gram(A, D):
    B = check_layer_pair(A, D, "per_sample_gram")[0]
    out = A.new_zeros(B, B)
    for i, Gi in _gradient_chunks(A, D):
        for j, Gj in _gradient_chunks(A, D):
            out[i : i + len(Gi), j : j + len(Gj)] = Gi.flatten(1) @ Gj.flatten(1).T
    return out


def per_sample_moments(A, D):
    """Mean and population variance (divided by B) over the batch of every gradient element; two
    passes in float64 so that float32 input keeps its accuracy when the mean dwarfs the spread."""
    B = check_layer_pair(A, D, "per_sample_moments")[0]
    A64, D64 = A.double(), D.double()
    mean = sum(G.sum(0) for _, G in _gradient_chunks(A64, D64)) / B
    var = sum((G - mean).square().sum(0) for _, G in _gradient_chunks(A64, D64)) / B
    return mean.to(A.dtype), var.to(A.dtype)


def per_sample_project(A, D, V):
    _, _, n_in, n_out = check_layer_pair(A, D, "per_sample_project")
    check_directions(V, A, n_out, n_in, "per_sample_project")
    return torch.cat([G.flatten(1) @ V.flatten(1).T for _, G in _gradient_chunks(A, D)])


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
    out = sum(W[i : i + len(G)].T @ G.flatten(1) for i, G in _gradient_chunks(A, D))
    return out.reshape(W.shape[1], n_out, n_in)
