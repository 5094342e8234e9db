"""The base of every symmetric operator: what the eigensolvers and estimators need of one.

An operator has ``shape`` (P, P), ``dtype``, ``device`` and ``matmat(V)`` for V of shape (P, K), which
serves all K columns with one pass over its data; ``Operator`` adds ``matvec``, ``@``, argument
checks, column chunking and ``to_scipy()``. ``DenseOperator`` wraps a dense symmetric matrix, and
``as_operator`` accepts either (a square tensor or any object with the four attributes).
"""
import torch


class Operator:
    """Base of the symmetric operators: a subclass provides ``_matmat`` for one chunk of columns."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device
    # Columns per autograd call: batching a few products amortises the graph traversal, while very
    # wide batches cost more than they save (measured on the MNIST MLP: 8 best, 100 as slow as 1).
    column_chunk = 8

    def matmat(self, V):
        """A V for V of shape (P, K)."""
        self.check_input(V)
        if self.column_chunk is None or V.shape[1] <= self.column_chunk:
            return self._matmat(V)
        return torch.cat([self._matmat(c) for c in V.split(self.column_chunk, 1)], 1)

    def _matmat(self, V):
        raise NotImplementedError

    def matvec(self, v):
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, x):
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def check_input(self, V):
        """Raise a clear error unless V is a (P, K) tensor of the operator's dtype and device."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"{type(self).__name__}.matmat: V must have shape ({self.shape[0]}, K), got "
                             f"{tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__}")
        if V.dtype != self.dtype or V.device != self.device:
            raise ValueError(f"{type(self).__name__}.matmat: V must be {self.dtype} on {self.device}, got {V.dtype} on {V.device}")

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X, dtype=np.float64).reshape(self.shape[0], -1)
            out = self.matmat(torch.from_numpy(X).to(self.device, self.dtype))
            return out.detach().double().cpu().numpy()

        return LinearOperator(self.shape, matvec=lambda x: mm(x).reshape(-1), matmat=mm, dtype=np.float64)


class DenseOperator(Operator):
    """A dense symmetric matrix as an operator (tests, small problems); ``matmat`` is the plain product."""

    def __init__(self, matrix):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator: matrix must be a square 2-D tensor, got {getattr(matrix, 'shape', matrix)}")
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matmat(self, V):
        return self.matrix @ V


def as_operator(op):
    """``op`` as an operator: a square tensor becomes a ``DenseOperator``; anything with ``matmat``,
    ``shape``, ``dtype`` and ``device`` is taken as it is."""
    if isinstance(op, torch.Tensor):
        return DenseOperator(op)
    if not all(hasattr(op, a) for a in ("matmat", "shape", "dtype", "device")):
        raise TypeError("lanczos: op must be a square tensor or an operator with shape, dtype, device and matmat(V)")
    return op


def check_symmetric(op, seed=0, rtol=1e-6):
    """Probe u^T A v against v^T A u for random u, v; raise ValueError if they differ."""
    op = as_operator(op)
    g = torch.Generator(device="cpu").manual_seed(seed)
    UV = torch.randn(op.shape[0], 2, generator=g, dtype=torch.float64).to(op.device, op.dtype)
    AUV = op.matmat(UV)
    a, b = float(UV[:, 0] @ AUV[:, 1]), float(UV[:, 1] @ AUV[:, 0])
    scale = float(AUV.norm() * UV.norm())
    if abs(a - b) > rtol * max(scale, 1e-300):
        raise ValueError(f"lanczos: the operator is not symmetric (u^T A v = {a:.6g}, v^T A u = {b:.6g})")
