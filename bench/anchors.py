"""The comparison libraries' top-k Hessian eigenvalues, as their users call them, shared by the
benchmarks: curvlinops' ``HessianLinearOperator`` in scipy ``eigsh``, and hessian-eigenthings' ``lanczos``.
Both run under the math backend of ``scaled_dot_product_attention`` (the fused one has no double
backward). Each returns (eigenvalues, largest first; the Hessian-vector products it asked for)."""
import sys

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import Counted


def optional(fn):
    """Run a comparison library's part; a missing or failing library is reported, not fatal."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}


def pyhessian_module():
    """PyHessian's module (the package re-exports the class ``hessian`` under its module's name)."""
    import pyhessian  # noqa: F401

    return sys.modules["pyhessian.hessian"]


def torch_eig_shim():
    """PyHessian 0.1's density calls ``torch.eig``, removed from torch: answer it with ``torch.linalg.eigh``
    (its matrices are symmetric tridiagonal)."""
    def eig(T, eigenvectors=False):
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), V

    torch.eig = eig


def curvlinops_eigsh_top(model, loss_module, data, k, tol):
    """curvlinops + scipy ``eigsh`` (float32, a seeded start vector)."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    with sdpa_kernel(SDPBackend.MATH):
        op = HessianLinearOperator(model, loss_module, list(model.parameters()), data).to_scipy()
        mv = Counted(lambda v: op @ v)
        P = op.shape[0]
        vals = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float32), k=k, which="LA", tol=tol,
                     v0=np.random.default_rng(0).standard_normal(P).astype(np.float32))[0]
    return sorted(vals.tolist(), reverse=True), mv.n


def eigenthings_top(model, loss_module, data, k, tol, max_iter):
    """hessian-eigenthings ``lanczos`` with reorthogonalisation. It stores and reorthogonalises against
    every step and ran to max_iter in quick runs: capped at ``max_iter`` (its eigenvalues are then
    compared with the converged ones)."""
    import hessian_eigenthings as he

    op = he.HessianOperator(model, data, he.supervised_loss(loss_module))
    op.matvec = Counted(op.matvec)
    with sdpa_kernel(SDPBackend.MATH):
        r = he.lanczos(op, k=k, max_iter=max_iter, tol=tol, which="LA", seed=0, reorthogonalize=True)
    return sorted((float(v) for v in r.eigenvalues), reverse=True), op.matvec.n
