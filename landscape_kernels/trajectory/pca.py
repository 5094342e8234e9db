"""Streaming PCA of weight trajectories (Feng & Tu 2021; docs/architecture.md).

Snapshots arrive in chunks of shape (T_c, N) through ``partial_fit``; the attributes follow
scikit-learn's names (``mean_``, ``components_`` (k, N), ``explained_variance_`` (sample covariance,
divided by n - 1), ``explained_variance_ratio_``, ``n_samples_seen_``, ``n_features_in_``). All
statistics are float64 whatever the snapshots' dtype. Modes:

- ``exact``: the float64 mean and scatter matrix M2 (N x N) merged chunk by chunk (Chan et al.'s
  parallel update: on the CPU each chunk centred on its own mean goes through BLAS syrk, on a GPU
  through the compiled ``trajectory_cov_update``), eigendecomposed once at the end; chunk sizes and
  order change nothing but rounding. Memory N^2 float64: for N up to ~20k.
- ``gram``: keeps the snapshots and the T x T Gram matrix of the snapshots (shifted by the first
  chunk's mean so that a large common offset costs no digits); for T much smaller than N.
- ``sketch``: Frequent Directions (Liberty 2013; Ghashami et al. 2016) on the shifted snapshots with
  ``sketch_size`` = l rows (a buffer of 2 l), plus the exact running mean. Memory O(l N). The sketch
  alone underestimates every variance by between 0 and the total shrinkage D / (n - 1); the
  variances reported add back half of it (the "robust" estimate of Luo et al. 2016, which leaves the
  components unchanged), so each lies within ``sketch_error_bound_`` = D / (2 (n - 1)) of the true
  one, either side; D is at most ||X - X_k||_F^2 / (l - k) for any k < l.
- ``auto``: ``exact`` when the N x N scatter matrix fits ``memory_budget`` bytes (and N <= 20,000),
  ``gram`` for ``fit`` on a whole matrix with T < N, else ``sketch``.

``precision="float32"`` (exact mode) keeps the scatter matrix in float32 and eigendecomposes it there:
about twice as fast and half the memory, for float32 accuracy (each chunk is centred on its own mean
before its GEMM and merged by Chan's update, so a common offset costs nothing; a variance far below the
largest, relative to it, keeps only what float32 holds of it: errors of order 1e-7 times the largest
variance). The outputs stay float64.

Component signs are fixed so that each component's entry of largest magnitude is positive.
"""
import numpy as np
import torch

from ..kernels import ops
from ..kernels.checks import all_finite

MODES = ("auto", "exact", "gram", "sketch")
PRECISIONS = ("float64", "float32")
EXACT_MAX_FEATURES = 20_000


def _mean64(X):
    """Column means of X in float64, one column tile at a time: a float64 copy of a whole chunk of a
    million-parameter trajectory would be larger than the sketch itself."""
    out = torch.empty(X.shape[1], dtype=torch.float64, device=X.device)
    width = max(1, (1 << 20) // X.shape[0])
    for c in range(0, X.shape[1], width):
        out[c : c + width] = X[:, c : c + width].double().mean(0)
    return out


def _row_sq_norms64(X):
    """Squared row norms of X accumulated in float64, one column tile at a time (no float64 copy)."""
    out = torch.zeros(X.shape[0], dtype=torch.float64, device=X.device)
    width = max(1, (1 << 20) // max(X.shape[0], 1))
    for c in range(0, X.shape[1], width):
        out += X[:, c : c + width].double().square().sum(1)
    return out


def add_scatter_upper(M2, X, alpha=1.0):
    """M2 += alpha X^T X on (at least) the upper triangle of the (N, N) M2, in M2's dtype, in place:
    BLAS syrk (half a GEMM's work, no temporary) on the CPU, a GEMM elsewhere."""
    X = X.to(M2.dtype)
    if M2.device.type != "cpu" or not M2.is_contiguous():
        M2.addmm_(X.T, X, alpha=alpha)
        return
    from scipy.linalg import blas

    syrk = blas.ssyrk if M2.dtype == torch.float32 else blas.dsyrk
    c = M2.numpy().T  # the Fortran-ordered view BLAS updates in place; its lower triangle is M2's upper
    out = syrk(alpha, X.contiguous().numpy().T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
    if not np.shares_memory(out, c):  # a copy was made after all: put the result back
        M2.copy_(torch.from_numpy(np.ascontiguousarray(out.T)))


def symmetric_eigh_upper(M):
    """Ascending eigenvalues and eigenvectors (columns) of the symmetric M from its upper triangle. On
    the CPU through LAPACK's divide and conquer as scipy ships it (on this project's 2-core AMD CPU
    0.6x the time of torch.linalg.eigh for N = 2,500, float64); elsewhere torch.linalg.eigh."""
    if M.device.type != "cpu":
        return torch.linalg.eigh(M, UPLO="U")
    import scipy.linalg

    lam, vecs = scipy.linalg.eigh(M.numpy(), lower=False, driver="evd", check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(vecs)


class StreamingPCA:
    def __init__(self, n_components=None, mode="auto", sketch_size=None, memory_budget=2 * 2**30, precision="float64"):
        if mode not in MODES:
            raise ValueError(f"StreamingPCA: mode must be one of {MODES}, got {mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"StreamingPCA: precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "float32" and mode not in ("exact", "auto"):
            raise ValueError(f"StreamingPCA: precision='float32' is a form of exact mode, got mode={mode!r}")
        if n_components is not None and (not isinstance(n_components, int) or n_components < 1):
            raise ValueError(f"StreamingPCA: n_components must be a positive int or None, got {n_components!r}")
        if sketch_size is not None and (not isinstance(sketch_size, int) or sketch_size < 2):
            raise ValueError(f"StreamingPCA: sketch_size must be an int >= 2 or None, got {sketch_size!r}")
        if n_components is not None and sketch_size is not None and sketch_size <= n_components:
            raise ValueError(f"StreamingPCA: sketch_size ({sketch_size}) must exceed n_components ({n_components})")
        self.n_components, self.mode, self.sketch_size = n_components, mode, sketch_size
        self.memory_budget, self.precision = memory_budget, precision
        self._reset()

    def _reset(self):
        self.n_samples_seen_ = 0
        self.n_features_in_ = None
        self.mode_ = None  # the mode in use once the first chunk arrived
        self._mean = self._M2 = self._shift = None
        self._chunks, self._gram = [], None  # gram mode
        self._buffer, self._rows, self._shrinkage, self._sq_norm_sum = None, 0, 0.0, 0.0  # sketch mode
        self._result = None

    # ------------------------------------------------------------------------------------------ input
    def fit(self, X):
        """PCA of the whole (T, N) matrix (forgets earlier data)."""
        self._reset()
        X = self._as_tensor(X, "X")
        if self.mode == "auto" and X.shape[0] < X.shape[1] and not self.exact_fits(X.shape[1]):
            self.mode_ = "gram"
        return self.partial_fit(X)

    def partial_fit(self, X):
        """Merge a chunk of snapshots (T_c, N) (a tensor or numpy array, float32 or float64)."""
        X = self._as_tensor(X, "X")
        if self.n_features_in_ is None:
            self._start(X)
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"StreamingPCA.partial_fit: chunk has N = {X.shape[1]} parameters, earlier chunks had "
                             f"{self.n_features_in_}")
        elif X.device != self._mean.device:
            raise ValueError(f"StreamingPCA.partial_fit: chunk is on {X.device}, earlier chunks on {self._mean.device}")
        getattr(self, "_merge_" + self.mode_)(X)
        self.n_samples_seen_ += X.shape[0]
        self._result = None
        return self

    def _as_tensor(self, X, name):
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"StreamingPCA: {name} must be a tensor or numpy array, got {type(X).__name__}")
        if X.dim() != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"StreamingPCA: {name} must have shape (T, N) with T, N > 0, got shape {tuple(X.shape)}")
        if X.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"StreamingPCA: {name} must be float32 or float64, got {X.dtype}")
        if not all_finite(X):
            bad = int((~torch.isfinite(X)).any(1).sum())
            raise ValueError(f"StreamingPCA: {name} has {bad} snapshot(s) with NaN/Inf (after {self.n_samples_seen_} "
                             "snapshots merged); nothing from this chunk was merged")
        return X

    def exact_fits(self, N):
        """Whether the N x N scatter matrix of exact mode (float64, or float32 with that precision) fits
        ``memory_budget``."""
        return N <= EXACT_MAX_FEATURES and self._scatter_bytes() * N * N <= self.memory_budget

    def _scatter_bytes(self):
        return 4 if self.precision == "float32" else 8

    def _start(self, X):
        N = X.shape[1]
        self.n_features_in_ = N
        if self.mode_ is None:
            self.mode_ = self.mode if self.mode != "auto" else ("exact" if self.exact_fits(N) else "sketch")
        if self.precision == "float32" and self.mode_ != "exact":
            raise ValueError(f"StreamingPCA: precision='float32' needs exact mode, but N = {N} does not fit memory_budget "
                             f"({self.memory_budget} bytes) and auto chose {self.mode_!r}")
        if self.mode_ == "sketch" and self.sketch_size is None and self.n_components is None:
            raise ValueError("StreamingPCA: sketch mode (chosen for N = %d) needs n_components or sketch_size" % N)
        self._mean = torch.zeros(N, dtype=torch.float64, device=X.device)
        self._shift = _mean64(X)
        if self.mode_ == "exact":
            self._M2 = torch.zeros(N, N, dtype=getattr(torch, self.precision), device=X.device)
        elif self.mode_ == "sketch":
            ell = self.sketch_size or 2 * self.n_components
            self._buffer = torch.zeros(2 * ell, N, dtype=X.dtype, device=X.device)

    def _merge_mean(self, X, chunk_mean=None):
        n, T = self.n_samples_seen_, X.shape[0]
        self._mean += ((_mean64(X) if chunk_mean is None else chunk_mean) - self._mean) * (T / (n + T))

    def _merge_exact(self, X):
        if self.precision == "float64" and X.device.type != "cpu":
            ops.trajectory_cov_update(self._M2, self._mean, self.n_samples_seen_, X, check_finite=False)
            return
        # Chan et al.'s merge with the chunk's scatter about its own float64 mean, in the scatter's dtype
        # (on the CPU through BLAS syrk, half the work of the compiled op's GEMM)
        n, T = self.n_samples_seen_, X.shape[0]
        chunk_mean = _mean64(X)
        centred = X.to(self._M2.dtype) - chunk_mean.to(self._M2.dtype)
        add_scatter_upper(self._M2, centred)
        # what the rounding of the mean left in the centred rows (s), and Chan's merge term (d)
        s, d = centred.sum(0, dtype=torch.float64), chunk_mean - self._mean
        add_scatter_upper(self._M2, s[None], alpha=-1.0 / T)
        if n:
            add_scatter_upper(self._M2, d[None], alpha=n * T / (n + T))
        self._merge_mean(X, chunk_mean)

    def _merge_gram(self, X):
        C = X.double() - self._shift
        cross = [C @ (S.double() - self._shift).T for S in self._chunks]
        T_old, T = (self._gram.shape[0] if self._gram is not None else 0), X.shape[0]
        gram = torch.empty(T_old + T, T_old + T, dtype=torch.float64, device=X.device)
        if T_old:
            gram[:T_old, :T_old] = self._gram
            gram[T_old:, :T_old] = torch.cat(cross, 1)
            gram[:T_old, T_old:] = gram[T_old:, :T_old].T
        gram[T_old:, T_old:] = C @ C.T
        self._gram = gram
        self._chunks.append(X)
        self._merge_mean(X)

    def _merge_sketch(self, X):
        self._merge_mean(X)
        ell = self._buffer.shape[0] // 2
        shift = self._shift.to(self._buffer.dtype)
        start = 0
        while start < X.shape[0]:  # small groups that fit the buffer's free rows: no float64 copy of the chunk
            count = min(16, X.shape[0] - start, self._buffer.shape[0] - self._rows)
            if count == 0:  # full: a Frequent Directions step leaves fewer than ell rows
                self._shrink(ell)
                continue
            target = self._buffer[self._rows : self._rows + count]
            target.copy_(X[start : start + count]).sub_(shift)
            self._sq_norm_sum += float(_row_sq_norms64(target).sum())
            self._rows += count
            start += count

    def _shrink(self, keep):
        """Frequent Directions step: rotate the buffer onto its right singular vectors and subtract the
        keep-th largest squared singular value from all (keep = 0: rotate only, lose nothing)."""
        if self._rows == 0:
            return
        B = self._buffer[: self._rows]
        width = max(1, (1 << 22) // max(self._rows, 1))
        gram = torch.zeros(self._rows, self._rows, dtype=torch.float64, device=B.device)
        for c in range(0, B.shape[1], width):  # float64 Gram without a float64 copy of the buffer
            tile = B[:, c : c + width].double()
            gram += tile @ tile.T
        lam, U = torch.linalg.eigh(gram)  # ascending
        lam, U = lam.flip(0).clamp_min(0), U.flip(1)
        delta = float(lam[keep - 1]) if 0 < keep <= lam.numel() else 0.0
        # Directions at rounding level are dropped (their rows would be noise, not orthogonal to the
        # rest); what they held is added to the shrinkage, so the error bound stays rigorous.
        floor = float(lam[0]) * (1e-12 if B.dtype == torch.float64 else 1e-6)
        kept = lam - delta > max(floor, 1e-300)
        dropped = lam[~kept]
        delta_dropped = max(float(dropped.max()) - delta, 0.0) if dropped.numel() else 0.0
        r = int(kept.sum())
        M = (U[:, kept] * torch.sqrt((lam[kept] - delta) / lam[kept])).T.to(B.dtype)  # (r, rows)
        for c in range(0, B.shape[1], width):  # in place, one column tile at a time: no second buffer
            tile = B[:, c : c + width]
            tile[:r] = M @ tile
        self._buffer[r : self._rows] = 0
        self._rows = r
        self._shrinkage += delta + delta_dropped

    # ------------------------------------------------------------------------------------------ results
    def _require_data(self, what):
        if self.n_samples_seen_ == 0:
            raise RuntimeError(f"StreamingPCA.{what}: no snapshots yet; call partial_fit or fit first")

    def _solve(self):
        if self._result is not None:
            return self._result
        self._require_data("components_")
        n, N = self.n_samples_seen_, self.n_features_in_
        k = self.n_components if self.n_components is not None else min(n, N)
        if k > min(n, N):
            raise ValueError(f"StreamingPCA: n_components = {k} exceeds min(T, N) = min({n}, {N})")
        if self.mode_ != "exact":  # their components are built from the variance: none exist beyond its rank
            k = self._within_rank(k)
        scale = 1.0 / max(n - 1, 1)
        if self.mode_ == "exact":
            lam, vecs = symmetric_eigh_upper(self._M2)
            lam, vecs = lam.flip(0).double(), vecs.flip(1).T.double()  # descending, rows
            total = float(self._M2.diagonal().double().sum())
        elif self.mode_ == "gram":
            lam, vecs, total = self._solve_gram()
        else:
            lam, vecs, total = self._solve_sketch(k)
        lam, vecs = lam[:k].clamp_min(0), vecs[:k]
        if self.mode_ == "sketch":
            lam = lam + self._shrinkage / 2  # centre the one-sided Frequent Directions error
        # Sign: the entry of largest magnitude positive; reductions and an in-place flip, as k x N can be large.
        flip = vecs.amax(1) < -vecs.amin(1)
        vecs.mul_(torch.where(flip, -1.0, 1.0).to(vecs.dtype)[:, None])
        self._result = (vecs.contiguous(), lam * scale, total * scale)
        return self._result

    def _variance_rank(self):
        """How many directions the centred snapshots span (gram: exactly; sketch: as far as the sketch
        holds them), and whether the sketch is full (its size, not the data, may limit the rank)."""
        if self.mode_ == "gram":
            T = self._gram.shape[0]
            J = torch.eye(T, dtype=torch.float64, device=self._gram.device) - 1.0 / T
            lam = torch.linalg.eigvalsh(J @ self._gram @ J)
            return int((lam > 1e-12 * max(float(lam.max()), 0.0)).sum()) if float(lam.max()) > 0 else 0, False
        self._shrink(0)
        d = self._mean - self._shift
        spread = self._sq_norm_sum - self.n_samples_seen_ * float(d @ d)
        rank = self._rows if spread > 1e-12 * max(self._sq_norm_sum, 1e-300) else 0
        return rank, self._rows >= self._buffer.shape[0] // 2 - 1

    def _within_rank(self, k):
        rank, sketch_full = self._variance_rank()
        if self.n_components is None:
            return max(min(k, rank), 1) if rank else self._no_variance()
        if k <= rank:
            return k
        if rank == 0:
            self._no_variance()
        if sketch_full:
            raise ValueError(f"StreamingPCA: n_components = {k} exceeds the sketch's rank {rank}; raise sketch_size")
        raise ValueError(f"StreamingPCA: n_components = {k}, but the {self.n_samples_seen_} centred snapshots span "
                         f"only {rank} direction(s) (T snapshots span at most T - 1 around their mean); ask for at most "
                         f"{rank}")

    def _no_variance(self):
        raise ValueError(f"StreamingPCA: the {self.n_samples_seen_} snapshots do not vary (a constant trajectory): "
                         "there are no principal components to find")

    def _solve_gram(self):
        G = self._gram
        T = G.shape[0]
        J = torch.eye(T, dtype=torch.float64, device=G.device) - 1.0 / T
        lam, U = torch.linalg.eigh(J @ G @ J)
        lam, U = lam.flip(0), U.flip(1)
        C = torch.cat([S.double() for S in self._chunks]) - self._mean  # centred snapshots (T, N)
        vecs = U.T @ C
        vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return lam, vecs, float(lam.sum())

    def _solve_sketch(self, k):
        # With the buffer rotated, its rows are orthogonal: B = S V^T. The estimate of the centred
        # scatter, B^T B - n d d^T (d = mean - shift, exact), lives in span(V, d): solve it there with
        # small matrices only, so nothing of size (l, N) is copied.
        self._shrink(0)
        B = self._buffer[: self._rows]
        norms = _row_sq_norms64(B).sqrt()
        d = self._mean - self._shift
        Vd = (B.double() @ d if B.dtype == torch.float64 else (B @ d.to(B.dtype)).double()) / norms
        r = d - ((Vd / norms).to(B.dtype) @ B).double()  # d minus its part in span(V)
        r_norm = float(r.norm())
        extra = r_norm > 1e-12 * float(d.norm())
        size = self._rows + int(extra)
        small = torch.zeros(size, size, dtype=torch.float64, device=B.device)
        small[range(self._rows), range(self._rows)] = norms**2
        dQ = torch.cat([Vd, d.new_tensor([r_norm])]) if extra else Vd
        small -= self.n_samples_seen_ * torch.outer(dQ, dQ)
        lam, W = torch.linalg.eigh(small)
        lam, W = lam.flip(0), W.flip(1)
        if k > lam.numel():
            raise ValueError(f"StreamingPCA: n_components = {k} exceeds the sketch's rank {lam.numel()}; raise sketch_size")
        coeff = (W[: self._rows, :k] / norms[:, None]).T.to(B.dtype)  # components = coeff B + W[r]^T r / |r|
        vecs = torch.empty(k, B.shape[1], dtype=torch.float64, device=B.device)
        width = max(1, (1 << 22) // k)
        for c in range(0, B.shape[1], width):  # tile by tile: no (k, N) temporary beside the result
            tile = vecs[:, c : c + width]
            tile.copy_(coeff @ B[:, c : c + width])
            if extra:
                tile.addr_(W[self._rows, :k], r[c : c + width], alpha=1.0 / r_norm)
        total = self._sq_norm_sum - self.n_samples_seen_ * float(d @ d)  # exact trace of the scatter
        return lam, vecs, total

    @property
    def components_(self):
        return self._solve()[0]

    @property
    def explained_variance_(self):
        return self._solve()[1]

    @property
    def explained_variance_ratio_(self):
        vecs, var, total = self._solve()
        return var / total if total > 0 else torch.zeros_like(var)

    @property
    def mean_(self):
        self._require_data("mean_")
        return self._mean

    @property
    def sketch_error_bound_(self):
        """Sketch mode: every explained variance lies within this of the true one (0 in other modes)."""
        self._require_data("sketch_error_bound_")
        return self._shrinkage / (2 * max(self.n_samples_seen_ - 1, 1)) if self.mode_ == "sketch" else 0.0

    def transform(self, X, return_residual=False):
        """Projections theta_i(t) = (x(t) - mean_) . p_i, shape (T, k) float64; with ``return_residual``
        also the norm of each centred snapshot's part outside the components (T,)."""
        self._require_data("transform")
        X = self._as_tensor(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"StreamingPCA.transform: X has N = {X.shape[1]} parameters, the fit had {self.n_features_in_}")
        proj, residual = ops.trajectory_project(X, self.mean_, self.components_, check_finite=False)
        return (proj, residual) if return_residual else proj


def subspace_angles(A, B):
    """Principal angles (radians, ascending) between the row spaces of A (k, N) and B (k, N)."""
    qa = torch.linalg.qr(A.double().T)[0]
    qb = torch.linalg.qr(B.double().T)[0]
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)).flip(0)
