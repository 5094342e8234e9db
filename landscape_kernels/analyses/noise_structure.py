"""SGD noise structure of Mori et al. 2022: the noise strength along training and the
decoupling of (1/N) sum_mu ell_mu C_f^mu into L (1/N) sum_mu C_f^mu, from the per-sample kernels.

For a scalar output f and ell_mu = (f_mu - y_mu)^2 / 2, the per-sample gradients are
g_mu = (f_mu - y_mu) grad f_mu, so (1/N) sum g g^T = (2/N) sum ell_mu C_f^mu with C_f^mu = grad f_mu
grad f_mu^T. The P x P matrices are never formed: with J the (N, P) matrix of the grad f_mu, the
non-zero eigenvalues of (1/N) J^T diag(w) J are those of the N x N matrix (1/N) diag(w)^1/2 J J^T
diag(w)^1/2, and J J^T is the per-sample gradient Gram matrix the fused kernels give directly.
"""
from dataclasses import dataclass

import numpy as np
import torch

from ..capture.persample import PerSampleGradients


def half_squared_error(outputs, targets):
    """Mori et al. 2022's MSE: mean over samples of (f - y)^2 / 2 for a scalar output (outputs (N, 1) or (N,))."""
    return 0.5 * (outputs.reshape(-1) - targets.reshape(-1).to(outputs.dtype)).square().mean()


def _check_data(name, x, y):
    if x.shape[0] == 0:
        raise ValueError(f"{name}: x is empty")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x and y differ in samples: {x.shape[0]} and {y.shape[0]}")


def noise_strength(model, loss_fn, x, y, chunk=4096):
    """(noise strength, mean loss) over (x, y): (1/N) sum_mu |g_mu|^2 - |gbar|^2 over every trainable
    parameter (Mori et al. 2022; Tr Sigma = (N - B) / (B (N - 1)) times it), chunked over the data."""
    _check_data("noise_strength", x, y)
    sq, loss_sum, grad_sum = 0.0, 0.0, None
    for i in range(0, x.shape[0], chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        ps = PerSampleGradients(model, loss_reduction="mean")
        with ps:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
        n = xb.shape[0]
        sq += float(ps.sq_norms().double().sum())
        loss_sum += float(loss.detach()) * n
        part = torch.cat([g.reshape(-1).double() for g in ps.mean().values()]) * n
        grad_sum = part if grad_sum is None else grad_sum + part
    model.zero_grad(set_to_none=True)
    N = x.shape[0]
    return sq / N - float((grad_sum / N).square().sum()), loss_sum / N


def output_gradient_gram(model, x):
    """(N, N) Gram matrix J J^T of the per-sample gradients of the scalar output f(x_mu)."""
    ps = PerSampleGradients(model, loss_reduction="sum")
    with ps:
        model.zero_grad(set_to_none=True)
        out = model(x)
        if out.dim() == 2 and out.shape[1] != 1 or out.dim() > 2:
            raise ValueError(f"output_gradient_gram: the model must have one output, got outputs of shape {tuple(out.shape)}")
        out.sum().backward()
    model.zero_grad(set_to_none=True)
    return ps.gram().double()


@dataclass
class DecouplingSpectra:
    """Eigenvalues (descending) of A = (1/N) sum ell_mu C_f^mu and of its decoupled form
    B = L (1/N) sum C_f^mu over N samples, and how far apart they are: ``log_ratio_top`` is the median
    |log10(a_i / b_i)| over the top half of the (rank-many) eigenvalues, ``log_ratio_bottom`` over the
    smallest tenth, ``top_relative`` the mean |a_i - b_i| / b_i of the top 10."""

    A: np.ndarray
    B: np.ndarray
    loss: float
    log_ratio_top: float
    log_ratio_bottom: float
    top_relative: float

    def to_dict(self):
        return {"A": self.A.tolist(), "B": self.B.tolist(), "loss": self.loss, "log_ratio_top": self.log_ratio_top,
                "log_ratio_bottom": self.log_ratio_bottom, "top_relative": self.top_relative}


def decoupling_spectra(model, x, y, rank_tol=1e-10):
    """Mori et al. 2022's decoupling check for a scalar-output model under ell = (f - y)^2 / 2 on (x, y)."""
    _check_data("decoupling_spectra", x, y)
    K = output_gradient_gram(model, x)
    with torch.no_grad():
        ell = 0.5 * (model(x).reshape(-1).double() - y.reshape(-1).double()).square()
    N, L = x.shape[0], float(ell.mean())
    root = ell.sqrt()
    a = torch.linalg.eigvalsh(root[:, None] * K * root[None, :] / N).flip(0).numpy()
    b = (L * torch.linalg.eigvalsh(K / N)).flip(0).numpy()
    rank = int(((a > rank_tol * a[0]) & (b > rank_tol * b[0])).sum())
    if rank < 10:
        raise ValueError(f"decoupling_spectra: only {rank} eigenvalues above {rank_tol:g} of the largest")
    ratio = np.abs(np.log10(a[:rank] / b[:rank]))
    return DecouplingSpectra(a[:rank], b[:rank], L, float(np.median(ratio[: rank // 2])),
                             float(np.median(ratio[rank - max(rank // 10, 1):])),
                             float(np.mean(np.abs(a[:10] - b[:10]) / b[:10])))
