"""Block Lanczos with full reorthogonalisation: extreme eigenpairs of symmetric operators.

An operator is anything with ``shape`` (P, P), ``dtype``, ``device`` and ``matmat(V)`` for V of shape
(P, K) (one pass over the data for all K columns, see ``operators.base``), or a dense symmetric tensor. The reorthogonalisation
of every new block against the whole basis (classical Gram-Schmidt twice) is the compiled op
``lanczos_reorth``; the block tridiagonal matrix is solved in float64.
"""
import math
import warnings
from dataclasses import dataclass

import torch

from ..kernels import ops
from ..operators.base import as_operator, check_symmetric
from .products import CountedProducts

WHICH = ("LA", "SA", "LM", "BE")


@dataclass
class EigenResult:
    """Eigenpairs from ``lanczos_eigs``: eigenvalues (k,) float64 in the order ``which`` asks for,
    eigenvectors (P, k) in the operator's dtype, residual norms ||A v - lambda v|| (k,) float64 (true or
    estimated, as ``residuals`` asked), and the error estimates of the eigenvalues they give."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    num_steps: int
    num_products: int
    eigenvalue_errors: torch.Tensor = None  # (k,) float64: min(r, r^2 / gap) per pair, see ``eigenvalue_error_bounds``

    def to_dict(self):
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "eigenvalue_errors": None if self.eigenvalue_errors is None else self.eigenvalue_errors.tolist(),
            "converged": self.converged,
            "num_steps": self.num_steps,
            "num_products": self.num_products,
        }


def _select(theta, k, which):
    """Indices of the k wanted Ritz values (theta ascending), in the order they are reported."""
    n = theta.numel()
    if which == "LA":
        return torch.arange(n - 1, n - 1 - k, -1)
    if which == "SA":
        return torch.arange(k)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    high = (k + 1) // 2  # BE: half from each end, the extra one from the high end
    return torch.cat([torch.arange(n - 1, n - 1 - high, -1), torch.arange(k - high)])


_SEGMENT_ELEMENTS = 1 << 24  # basis numbers per segment (64 MB of float32) unless 4 rows hold more


class _Basis:
    """The Krylov basis as rows kept in fixed-size segments. It grows one segment at a time and never
    copies what it holds, so its memory is the rows stored plus at most one segment: a basis grown by
    doubling one tensor holds the old and the new copy at once (three times the basis, 8.8 GB of
    float32 rows on an 11.5M-parameter model after 64 steps). ``rows_per_segment`` is a multiple of the
    block size, so a block never straddles two segments. Segments are at least 4 rows (on a 13.8M-
    parameter model 16 rows were 0.9 GB, the step by which the basis grew), and the last one holds only
    the rows the basis can reach (``max_rows``): with ``max_basis=20`` and 16-row segments the basis
    held 32 rows, 0.66 GB more than it used."""

    def __init__(self, P, block_size, max_rows, dtype, device):
        per_segment = max(4, _SEGMENT_ELEMENTS // max(P, 1))
        per_segment = -(-per_segment // block_size) * block_size
        self.max_rows = -(-max_rows // block_size) * block_size
        self.rows_per_segment = min(per_segment, self.max_rows)
        self.P, self.dtype, self.device = P, dtype, device
        self.segments = []

    def _segment(self, row):
        if row >= self.max_rows:
            raise AssertionError(f"lanczos: basis row {row} beyond the {self.max_rows} rows it was sized for")
        index = row // self.rows_per_segment
        while len(self.segments) <= index:
            count = min(self.rows_per_segment, self.max_rows - len(self.segments) * self.rows_per_segment)
            self.segments.append(torch.zeros(count, self.P, dtype=self.dtype, device=self.device))
        return self.segments[index], row - index * self.rows_per_segment

    def rows(self, lo, hi):
        """Rows lo..hi of one block (a view)."""
        segment, start = self._segment(lo)
        if start + hi - lo > segment.shape[0]:
            raise AssertionError(f"lanczos: basis rows {lo}..{hi} straddle a segment boundary")
        return segment[start : start + hi - lo]

    def set_row(self, row, value):
        segment, start = self._segment(row)
        segment[start] = value

    def reorthogonalise(self, w, n):
        """w (1, 1, P) made orthogonal to rows 0..n-1 (classical Gram-Schmidt twice per segment, the
        segments in turn); returns (w, norm)."""
        if n == 0:
            return ops.lanczos_reorth(self._segment(0)[0].unsqueeze(0), w, 0)
        for index in range(-(-n // self.rows_per_segment)):
            count = min(self.rows_per_segment, n - index * self.rows_per_segment)
            w, norm = ops.lanczos_reorth(self.segments[index].unsqueeze(0), w, count)
        return w, norm

    def rotate(self, Y):
        """Replace rows 0..l-1 by Y^T Q[:m] for Y (m, l), l <= m, in place: each slice of columns of the
        new rows depends only on the same slice of the old rows, so the work goes slice by slice and the
        scratch memory is two slices, not l rows."""
        m, l = Y.shape
        Yt = Y.T.to(self.dtype).to(self.device)
        width = max(1, _SEGMENT_ELEMENTS // m)
        for c0 in range(0, self.P, width):
            cols = slice(c0, min(self.P, c0 + width))
            old = torch.cat([self.segments[i][: min(self.rows_per_segment, m - start), cols]
                             for i, start in enumerate(range(0, m, self.rows_per_segment))])
            new = Yt @ old  # (l, width)
            for i, start in enumerate(range(0, l, self.rows_per_segment)):
                count = min(self.rows_per_segment, l - start)
                self.segments[i][:count, cols] = new[start : start + count]

    def combine(self, S):
        """(k, P) = S^T Q[:m] for S (m, k)."""
        out = torch.zeros(S.shape[1], self.P, dtype=self.dtype, device=self.device)
        for index, start in enumerate(range(0, S.shape[0], self.rows_per_segment)):
            part = S[start : start + self.rows_per_segment]
            out += part.T.to(self.dtype).to(self.device) @ self.segments[index][: part.shape[0]]
        return out


def _extend_basis(Q, used, W, gen, tol, step):
    """Orthonormalise the b rows of W (b, P) against the basis's first ``used`` rows and each other and
    store them as rows used .. used + b of the basis ``Q`` (a ``_Basis``). A row that vanishes (an
    invariant subspace was found) is replaced by a random direction orthogonal to everything so far,
    with a zero coupling. Returns the upper triangular coupling B (b, b) float64."""
    b = W.shape[0]
    B = torch.zeros(b, b, dtype=torch.float64)
    for c in range(b):
        n = used + c
        w, norm = Q.reorthogonalise(W[c : c + 1].unsqueeze(0), n)
        if c:  # couplings with the block's earlier vectors
            B[:c, c] = (Q.rows(used, n).double() @ W[c].double()).cpu()
        norm = float(norm)
        if norm > tol:
            B[c, c] = norm
        else:  # breakdown: restart this direction at random in the orthogonal complement
            for _ in range(3):
                r = torch.randn(1, 1, W.shape[1], generator=gen, dtype=torch.float64).to(W.device, W.dtype)
                w, norm = Q.reorthogonalise(r, n)
                norm = float(norm)
                if norm > 1e-3 * float(r.norm()):
                    break
            else:
                raise RuntimeError(f"lanczos_eigs: could not extend the basis at step {step} (dimension exhausted?)")
        Q.set_row(n, w[0, 0] / norm)
    return B


def _thick_restart(Q, T, theta, S, coupling, m, k, which, b, max_basis):
    """Thick restart (Wu & Simon): keep the l most wanted Ritz vectors of the basis rows 0..m-1 and the
    next block (rows m..m+b, orthogonal to them all) as the new basis rows 0..l+b-1. With
    A Q_m = Q_m T_m + Q_next B E^T, the kept vectors satisfy A Y = Y diag(theta) + Q_next (B S_last)^T,
    so T restarts as diag(theta) bordered by the arrow B S_last. Returns l, the next block's first row."""
    first = -(-k // b) * b  # l is a multiple of b, so the blocks after the restart stay within segments
    l = first + b * ((max_basis - first - 2 * b) // (2 * b))
    keep = _select(theta, l, which)
    following = Q.rows(m, m + b).clone()
    Q.rotate(S[:, keep])
    for i in range(b):
        Q.set_row(l + i, following[i])
    arrow = coupling @ S[m - b : m][:, keep]  # (b, l)
    T.zero_()
    T[:l, :l] = torch.diag(theta[keep])
    T[l : l + b, :l] = arrow
    T[:l, l : l + b] = arrow.T
    return l


RESIDUALS = ("true", "estimate")
CRITERIA = ("residual", "eigenvalue")


def eigenvalue_error_bounds(theta, wanted, res):
    """Error estimates of the Ritz values ``theta[wanted]`` (theta: all Ritz values, ascending) from their
    residual norms ``res``: min(r, r^2 / gap), gap the distance to the nearest other Ritz value.

    A Ritz pair with residual r has an eigenvalue within r (Krylov-Weinberg); when the other eigenvalues
    are at least ``gap`` away, within r^2 / gap (Kato-Temple; Parlett, The Symmetric Eigenvalue Problem,
    ch. 11). The gap is estimated from the Ritz values, as eigensolvers with an eigenvalue criterion do:
    an eigenvalue that no Ritz value has approached yet can make it an underestimate."""
    if theta.numel() == 1:  # no other Ritz value: no gap to use
        return res.clone()
    step = theta.diff()
    none = torch.full((1,), torch.inf, dtype=theta.dtype)
    gap = torch.minimum(torch.cat([none, step]), torch.cat([step, none]))[wanted]  # to the neighbour below, above
    return torch.minimum(res, res * res / gap.clamp_min(torch.finfo(torch.float64).tiny))


def rounding_floor(P, dtype):
    """The relative residual ||A v - lambda v|| / ||A|| that rounding alone leaves in dimension P."""
    return 10 * math.sqrt(P) * torch.finfo(dtype).eps


def lanczos_eigs(op, k, which="LA", num_iter=None, tol=1e-10, v0=None, seed=0, block_size=1,
                 check_symmetry=False, residuals="true", max_basis=None, criterion="residual"):
    """Extreme eigenpairs of a symmetric operator by block Lanczos with full reorthogonalisation.

    Args:
        op: square tensor or operator with ``matmat``.
        k: number of eigenpairs.
        which: "LA" largest algebraic, "SA" smallest, "LM" largest magnitude, "BE" both ends.
        num_iter: maximum number of block steps (basis size num_iter * block_size); default grows with k.
        tol: convergence when the residual estimate of every wanted pair is <= tol * ||A|| (the largest
            Ritz magnitude). With residuals="true", ``converged`` then says whether the true residuals
            meet it (or the rounding floor 10 sqrt(P) eps of the operator's dtype, if larger).
        v0: warm start: a (P,) vector or (P, r) earlier eigenvectors; their span seeds the first block
            (with a small random part, so directions outside it stay reachable).
        seed: seed of every random draw.
        block_size: vectors per step; use at least the multiplicity of repeated wanted eigenvalues.
        check_symmetry: probe the operator for symmetry first (two products).
        residuals: "true" computes ||A v - lambda v|| with one more product per eigenpair (one batched
            ``matmat``); "estimate" reports the Lanczos residual norms ||B_j s_i|| from the last step at
            no cost (equal to the true ones up to rounding for a symmetric operator, since the basis is
            fully reorthogonalised; ``converged`` then rests on them).
        max_basis: None (default) keeps every Lanczos vector (memory: steps x block_size x P); an int
            bounds the basis to that many vectors by thick restarts (keep the most wanted Ritz vectors,
            continue from the residual), for models whose P makes the full basis too large: memory
            about max_basis x P, at the cost of more products. At least k + 3 block_size; num_iter
            (default 10 max_basis / block_size) counts steps over all restarts.
        criterion: "residual" (default) stops when every wanted residual is <= tol * ||A||, for
            eigenvectors to that accuracy; "eigenvalue" when every wanted eigenvalue's error estimate
            min(r, r^2 / gap) is (``eigenvalue_error_bounds``): an eigenvalue converges quadratically in
            its residual, so ``tol`` then says how accurate the eigenvalues are, and well separated ones
            stop sooner (the eigenvectors are only as accurate as their residuals say). On Hessians whose
            top eigenvalues lie close together it takes about as many products as the residual
            criterion at the tol that gives the same eigenvalue accuracy (bench/lanczos.py).
    Returns: ``EigenResult``; ``num_products`` counts every column the operator was applied to.
    """
    if isinstance(op, torch.Tensor) and op.dim() == 2 and op.shape[0] == op.shape[1] and op.is_floating_point():
        gap = float((op - op.T).abs().max()) if op.numel() else 0.0
        if not gap <= 1e3 * torch.finfo(op.dtype).eps * float(op.abs().max()):  # also NaN
            raise ValueError(f"lanczos_eigs: op must be a symmetric matrix, but max |A - A^T| = {gap:.3g} (max |A| = "
                             f"{float(op.abs().max()):.3g}); use (A + A^T) / 2, or an eigensolver for general matrices")
    op = as_operator(op)
    P = op.shape[0]
    if op.shape != (P, P):
        raise ValueError(f"lanczos_eigs: op must be square, got shape {op.shape}")
    if which not in WHICH:
        raise ValueError(f"lanczos_eigs: which must be one of {WHICH}, got {which!r}")
    if not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"lanczos_eigs: k must be an int in [1, {P}] (the operator's dimension), got {k!r}")
    if residuals not in RESIDUALS:
        raise ValueError(f"lanczos_eigs: residuals must be one of {RESIDUALS}, got {residuals!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"lanczos_eigs: criterion must be one of {CRITERIA}, got {criterion!r}")
    b = int(block_size)
    if not 1 <= b <= P:
        raise ValueError(f"lanczos_eigs: block_size must be in [1, {P}], got {block_size!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"lanczos_eigs: tol must be a finite number >= 0, got {tol!r}")
    if num_iter is not None and (isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1):
        raise ValueError(f"lanczos_eigs: num_iter must be None or an int >= 1, got {num_iter!r}")
    if check_symmetry:
        check_symmetric(op, seed=seed)
    if max_basis is not None:
        if not isinstance(max_basis, int) or max_basis < k + 3 * b:
            raise ValueError(f"lanczos_eigs: max_basis must be an int >= k + 3 * block_size = {k + 3 * b}, got {max_basis!r}")
        if max_basis >= P:
            max_basis = None  # the whole space fits: no restarts needed
    if num_iter is None:
        num_iter = max(math.ceil((4 * k + 40) / b), 10) if max_basis is None else 10 * max_basis // b
    num_iter = int(num_iter)
    if max_basis is None or max_basis >= (num_iter + 1) * b:
        max_basis = None
        num_iter = min(num_iter, math.ceil(P / b))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    apply = CountedProducts(op, "lanczos_eigs")
    dtype, device = op.dtype, op.device

    start = torch.randn(b, P, generator=gen, dtype=torch.float64)
    if v0 is not None:
        v0 = v0.reshape(P, -1).T.double().cpu()
        if not bool(torch.isfinite(v0).all()):
            raise ValueError("lanczos_eigs: v0 contains NaN/Inf")
        seeds = v0 / v0.norm(dim=1, keepdim=True).clamp_min(1e-300)
        if seeds.shape[0] > b:  # fold the earlier vectors into the block
            seeds = torch.stack([s.sum(0) for s in seeds.chunk(b)])
        if seeds.shape[0] == b:  # one earlier vector per block column: start from exactly their span (the
            start = seeds      # residuals extend the basis; an invariant span breaks down into random vectors)
        else:
            start[: seeds.shape[0]] = seeds + 1e-3 * start[: seeds.shape[0]] / math.sqrt(P)
    # the basis grows segment by segment as the steps are taken, not allocated for num_iter up front: a
    # generous num_iter on a model with millions of parameters must not reserve num_iter x P memory
    rows = (num_iter + 1) * b if max_basis is None else max_basis  # basis rows, the next block's included
    Q = _Basis(P, b, rows, dtype, device)
    _extend_basis(Q, 0, start.to(device, dtype), gen, 0.0, 0)

    T = torch.zeros(rows, rows, dtype=torch.float64)
    norm_estimate, converged, steps, restarts = 0.0, False, 0, 0
    theta = S = None
    coupling = torch.zeros(b, b, dtype=torch.float64)  # B_j of the last step (zero once the space is exhausted)
    lo, fresh = 0, True  # the current block's first row; fresh: no previous block to subtract (start, restart)
    for j in range(num_iter):
        steps = j + 1
        hi = lo + b
        Qj = Q.rows(lo, hi)
        U = apply(Qj.T, j).T  # (b, P)
        alpha = (Qj.double() @ U.double().T)
        alpha = 0.5 * (alpha + alpha.T)
        T[lo:hi, lo:hi] = alpha
        m = hi  # basis size so far
        theta, S = torch.linalg.eigh(T[:m, :m])
        norm_estimate = max(norm_estimate, float(theta.abs().max()))
        if m >= P:  # the whole space: exact for a symmetric operator (the true residuals check it)
            converged = True
            coupling = torch.zeros(b, b, dtype=torch.float64)
            break
        W = U - (alpha.T.to(dtype).to(device) @ Qj)
        if not fresh:  # after a restart the full reorthogonalisation removes the kept Ritz vectors' part
            W = W - T[lo - b : lo, lo:hi].T.to(dtype).to(device) @ Q.rows(lo - b, lo)
        breakdown_tol = 1e-12 * max(norm_estimate, 1e-300) if dtype == torch.float64 else 1e-6 * max(norm_estimate, 1e-30)
        Bj = coupling = _extend_basis(Q, hi, W, gen, breakdown_tol, j)
        if hi + b <= rows:
            T[hi : hi + b, lo:hi] = Bj
            T[lo:hi, hi : hi + b] = Bj.T
        # residual estimates of the wanted Ritz pairs: ||B_j S[last block, i]||
        wanted = _select(theta, min(k, m), which)
        if m >= k:
            res = (Bj @ S[lo:hi][:, wanted]).norm(dim=0)
            if criterion == "eigenvalue":
                res = eigenvalue_error_bounds(theta, wanted, res)
            if bool((res <= tol * norm_estimate).all()):
                converged = True
                break
        lo, fresh = hi, False
        if max_basis is not None and lo + 2 * b > max_basis and j + 1 < num_iter:
            lo = _thick_restart(Q, T, theta, S, Bj, m, k, which, b, max_basis)
            fresh, restarts = True, restarts + 1
    theta, S = torch.linalg.eigh(T[:m, :m])
    if m < k:
        raise RuntimeError(f"lanczos_eigs: the basis has {m} vectors, fewer than k = {k}; raise num_iter")
    wanted = _select(theta, k, which)
    values = theta[wanted]
    vectors = Q.combine(S[:, wanted]).T  # (P, k)
    del Q  # free the basis before the residual products: on a large model it is most of the memory
    scale = max(norm_estimate, torch.finfo(torch.float64).tiny)
    asymmetry = None
    if residuals == "true":
        AV = apply(vectors, steps)
        res = (AV - vectors * values.to(dtype).to(device)).norm(dim=0).double().cpu()
        errors = eigenvalue_error_bounds(theta, wanted, res)
        # converged means the true residuals (or the error estimates from them) meet tol, or the rounding
        # floor of the operator's dtype: when the basis fills the space, or for an operator that is not
        # symmetric, the estimates may not hold
        measured = errors if criterion == "eigenvalue" else res
        converged = bool((measured <= max(tol, rounding_floor(P, dtype)) * scale).all())
        if k > 1:  # V^T A V is symmetric for a symmetric A: its antisymmetric part measures the failure, free
            G = (vectors.T @ AV).double().cpu()
            asymmetry = float((G - G.T).abs().max()) / scale
    else:  # A Q_m = Q_m T_m + Q_{m+1} B_j E_j^T, so A v_i - theta_i v_i = Q_{m+1} B_j s_i[last block]
        res = (coupling @ S[m - b : m][:, wanted]).norm(dim=0)
        errors = eigenvalue_error_bounds(theta, wanted, res)
    if asymmetry is not None and asymmetry > max(1e3 * rounding_floor(P, dtype), 1e-6):
        warnings.warn(f"lanczos_eigs: the operator is not symmetric (|v_i^T A v_j - v_j^T A v_i| up to "
                      f"{asymmetry:.3g} ||A||, ||A|| ~ {norm_estimate:.3g}); Lanczos needs a symmetric operator, so "
                      "these eigenpairs are not its eigenpairs (check_symmetry=True probes an operator first)",
                      LanczosNotConverged, stacklevel=2)
    elif not converged and tol > 0:  # tol = 0 asks for exactly num_iter steps
        worst = f"largest eigenvalue error estimate {float(errors.max()):.3g}" if criterion == "eigenvalue" else \
            f"largest residual {float(res.max()):.3g}"
        warnings.warn(f"lanczos_eigs: not converged to tol {tol:g} in {steps} steps ({worst}, "
                      f"||A|| ~ {norm_estimate:.3g}); the eigenpairs may be inaccurate or a "
                      "wanted eigenvalue missing: raise num_iter (the result has converged=False)",
                      LanczosNotConverged, stacklevel=2)
    return EigenResult(values, vectors, res, converged, steps, apply.products, errors)


class LanczosNotConverged(RuntimeWarning):
    """``lanczos_eigs`` stopped at ``num_iter`` before its residuals reached ``tol``."""


