"""Validation of op arguments, shared by the reference ops and the public wrappers in ``ops``.

Each error names the argument, what was expected and what was given (docs/architecture.md); nothing is silently
broadcast or cast.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_EXACT_COUNT = 2**53  # the largest count a float64 holds exactly


def is_int(v):
    """A Python int (or a symbolic one under torch.compile), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def check_tensor(x, name, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_layer_pair(A, D, op):
    """Check A (B, in) / (B, T, in) and D (B, out) / (B, T, out); return (B, T, in, out)."""
    check_tensor(A, "A", op)
    check_tensor(D, "D", op)
    if A.dim() not in (2, 3):
        raise ValueError(f"{op}: A (layer inputs) must have shape (B, in) or (B, T, in), got shape {tuple(A.shape)}")
    if D.dim() != A.dim():
        raise ValueError(
            f"{op}: D (output gradients) must have the same rank as A ({A.dim()}-D), got shape {tuple(D.shape)}"
        )
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: A must be float32 or float64, got {A.dtype}")
    _check_like_A(D, "D", A, op)
    if A.shape[0] != D.shape[0]:
        raise ValueError(
            f"{op}: A and D must have the same batch size, got A {tuple(A.shape)} and D {tuple(D.shape)}"
        )
    if A.shape[0] == 0:
        raise ValueError(f"{op}: empty batch (B = 0): per-sample statistics need at least one sample")
    T = A.shape[1] if A.dim() == 3 else 1
    if A.dim() == 3:
        if D.shape[1] != A.shape[1]:
            raise ValueError(
                f"{op}: A and D must have the same number of positions T, got A {tuple(A.shape)} and D {tuple(D.shape)}"
            )
        if T == 0:
            raise ValueError(f"{op}: T = 0 positions: nothing to sum over")
    if A.shape[-1] == 0 or D.shape[-1] == 0:
        raise ValueError(f"{op}: A and D need a non-empty last dimension, got A {tuple(A.shape)} and D {tuple(D.shape)}")
    return A.shape[0], T, A.shape[-1], D.shape[-1]


def check_directions(V, A, out_features, in_features, op):
    check_tensor(V, "V", op)
    if V.dim() != 3 or V.shape[1] != out_features or V.shape[2] != in_features:
        raise ValueError(
            f"{op}: V (directions) must have shape (K, out, in) = (K, {out_features}, {in_features}), "
            f"got shape {tuple(V.shape)}"
        )
    if V.shape[0] == 0:
        raise ValueError(f"{op}: V holds no directions (K = 0)")
    _check_like_A(V, "V", A, op)


def check_centre(M, A, out_features, in_features, op):
    """M (out, in), A's dtype and device: the centre of per_sample_stats_about."""
    check_tensor(M, "M", op)
    if tuple(M.shape) != (out_features, in_features):
        raise ValueError(f"{op}: M (the centre) must have shape (out, in) = ({out_features}, {in_features}), "
                         f"got shape {tuple(M.shape)}")
    _check_like_A(M, "M", A, op)


def _check_like_A(x, name, A, op):
    if x.dtype != A.dtype:
        raise TypeError(f"{op}: {name} must have A's dtype {A.dtype}, got {x.dtype}")
    if x.device != A.device:
        raise ValueError(f"{op}: {name} must be on A's device {A.device}, got {x.device}")


def all_finite(x):
    """Whether x has no NaN/Inf. One reduction without a temporary: a NaN/Inf makes the sum
    non-finite; only then (or if the sum of finite values overflowed) is the exact element-wise test
    run, over row tiles so that no mask the size of x is ever held (torch.isfinite(x).all() briefly
    needs several times x's size)."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    step = max(1, (1 << 20) // max(rows.shape[1], 1))
    return all(bool(torch.isfinite(rows[r : r + step]).all()) for r in range(0, rows.shape[0], step))


def check_finite(x, name, op):
    """Raise a ``ValueError`` naming ``name`` when x has a NaN/Inf. Inside ``torch.compile`` / ``torch.export``
    the test is an in-graph assertion (no data-dependent branch in the traced graph), which raises a
    ``RuntimeError`` with the same message when the compiled code runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(x).all(), f"{op}: {name} contains NaN/Inf values (finite input is required)")
        return
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{op}: {name} contains {bad} NaN/Inf value(s) (finite input is required)")


def check_weights(W, A, batch, op):
    check_tensor(W, "W", op)
    if W.dim() != 2 or W.shape[0] != batch:
        raise ValueError(f"{op}: W (weights) must have shape (B, K) = ({batch}, K), got shape {tuple(W.shape)}")
    if W.shape[1] == 0:
        raise ValueError(f"{op}: W holds no weight vectors (K = 0)")
    _check_like_A(W, "W", A, op)


def check_reorth(Q, W, j, op="lanczos_reorth"):
    check_tensor(Q, "Q", op)
    check_tensor(W, "W", op)
    if Q.dim() != 3:
        raise ValueError(f"{op}: Q (bases) must have shape (C, m, P), got shape {tuple(Q.shape)}")
    if W.dim() != 3:
        raise ValueError(f"{op}: W (new vectors) must have shape (C, b, P), got shape {tuple(W.shape)}")
    if Q.shape[0] != W.shape[0] or Q.shape[2] != W.shape[2]:
        raise ValueError(f"{op}: Q (C, m, P) and W (C, b, P) must agree in C and P, got Q {tuple(Q.shape)} and W {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{op}: W must be non-empty, got shape {tuple(W.shape)}")
    if not is_int(j) or not 0 <= j <= Q.shape[1]:
        raise ValueError(f"{op}: j (basis vectors in use) must be an int in [0, m] = [0, {Q.shape[1]}], got {j!r}")
    if Q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: Q must be float32 or float64, got {Q.dtype}")
    if W.dtype != Q.dtype:
        raise TypeError(f"{op}: W must have Q's dtype {Q.dtype}, got {W.dtype}")
    if W.device != Q.device:
        raise ValueError(f"{op}: W must be on Q's device {Q.device}, got {W.device}")


def check_snapshots(X, op):
    """X (T, N) float32/float64 snapshots, T, N > 0."""
    check_tensor(X, "X", op)
    if X.dim() != 2:
        raise ValueError(f"{op}: X (snapshots) must have shape (T, N), got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{op}: X must have at least one snapshot and one parameter, got shape {tuple(X.shape)}")
    if X.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: X must be float32 or float64, got {X.dtype}")


def _check_float64_vector_like(t, name, shape, X, op):
    check_tensor(t, name, op)
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        raise TypeError(f"{op}: {name} must be float64, got {t.dtype}")
    if t.device != X.device:
        raise ValueError(f"{op}: {name} must be on X's device {X.device}, got {t.device}")


def check_cov_update(M2, mean, count, X, op="trajectory_cov_update"):
    check_snapshots(X, op)
    N = X.shape[1]
    _check_float64_vector_like(M2, "M2", (N, N), X, op)
    _check_float64_vector_like(mean, "mean", (N,), X, op)
    if not (M2.is_contiguous() and mean.is_contiguous()):
        raise ValueError(f"{op}: M2 and mean must be contiguous (they are updated in place)")
    if not is_int(count) or count < 0:
        raise ValueError(f"{op}: count (snapshots merged so far) must be an int >= 0, got {count!r}")
    if count > MAX_EXACT_COUNT - X.shape[0]:
        raise ValueError(f"{op}: count + T = {count} + {X.shape[0]} exceeds 2^53, where float64 weights of the "
                         "merge stop being exact (and int64 sums overflow near 2^63)")


def check_project(X, mean, basis, op="trajectory_project"):
    check_snapshots(X, op)
    N = X.shape[1]
    _check_float64_vector_like(mean, "mean", (N,), X, op)
    check_tensor(basis, "basis", op)
    if basis.dim() != 2 or basis.shape[1] != N:
        raise ValueError(f"{op}: basis must have shape (k, N) with N = {N}, got shape {tuple(basis.shape)}")
    _check_float64_vector_like(basis, "basis", tuple(basis.shape), X, op)


def check_profile(z0, zd, direction, offset, weight, bias, target, op="profile_ce_losses", values=True):
    """Shapes, dtypes, devices and (with ``values``: not in a fake kernel) index ranges of the loss-profile
    op's arguments."""
    for t, name in ((z0, "z0"), (zd, "zd"), (direction, "direction"), (offset, "offset"), (weight, "weight"),
                    (target, "target")):
        check_tensor(t, name, op)
    if z0.dim() != 2:
        raise ValueError(f"{op}: z0 must have shape (R, H), got shape {tuple(z0.shape)}")
    if z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: z0 must be float32 or float64, got {z0.dtype}")
    R, H = z0.shape
    if zd.dim() != 3 or tuple(zd.shape[1:]) != (R, H) or zd.shape[0] == 0:
        raise ValueError(f"{op}: zd must have shape (U, R, H) = (U, {R}, {H}) with U >= 1, got shape {tuple(zd.shape)}")
    if direction.dim() != 1 or direction.dtype != torch.long:
        raise ValueError(f"{op}: direction must be a 1-D int64 tensor, got {direction.dtype} of shape {tuple(direction.shape)}")
    M = direction.shape[0]
    if offset.shape != (M,):
        raise ValueError(f"{op}: offset must have shape (M,) = ({M},), got shape {tuple(offset.shape)}")
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have shape (C, H) with H = {H}, got shape {tuple(weight.shape)}")
    C = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", op)
        if bias.shape != (C,):
            raise ValueError(f"{op}: bias must have shape (C,) = ({C},), got shape {tuple(bias.shape)}")
    if target.shape != (R,) or target.dtype != torch.long:
        raise ValueError(f"{op}: target must be int64 of shape (R,) = ({R},), got {target.dtype} of shape {tuple(target.shape)}")
    for t, name in ((zd, "zd"), (offset, "offset"), (weight, "weight")) + (((bias, "bias"),) if bias is not None else ()):
        if t.dtype != z0.dtype:
            raise TypeError(f"{op}: {name} must have z0's dtype {z0.dtype}, got {t.dtype}")
    for t, name in ((zd, "zd"), (direction, "direction"), (offset, "offset"), (weight, "weight"), (target, "target")) + \
            (((bias, "bias"),) if bias is not None else ()):
        if t.device != z0.device:
            raise ValueError(f"{op}: {name} must be on z0's device {z0.device}, got {t.device}")
    if not values:
        return
    if M and (int(direction.min()) < 0 or int(direction.max()) >= zd.shape[0]):
        raise ValueError(f"{op}: direction values must lie in [0, U) = [0, {zd.shape[0]})")
    if R and (int(target.min()) < 0 or int(target.max()) >= C):
        raise ValueError(f"{op}: target values must be classes in [0, C) = [0, {C})")
