"""Validation of op arguments, shared by the reference ops and the public wrappers in ``ops``.

Each error names the argument, what was expected and what was given (DESIGN §3); nothing is silently
broadcast or cast.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


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


def _check_like_A(x, name, A, op):
    if x.dtype != A.dtype:
        raise TypeError(f"{op}: {name} must have A's dtype {A.dtype}, got {x.dtype}")
    if x.device != A.device:
        raise ValueError(f"{op}: {name} must be on A's device {A.device}, got {x.device}")


def check_finite(x, name, op):
    # One reduction without a temporary: a NaN/Inf makes the sum non-finite. Only then (or if the sum
    # of finite values overflowed) is the exact element-wise test run.
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{op}: {name} contains {bad} NaN/Inf value(s); per-sample statistics need finite input")


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
    if not isinstance(j, int) or not 0 <= j <= Q.shape[1]:
        raise ValueError(f"{op}: j (basis vectors in use) must be an int in [0, m] = [0, {Q.shape[1]}], got {j!r}")
    if Q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: Q must be float32 or float64, got {Q.dtype}")
    if W.dtype != Q.dtype:
        raise TypeError(f"{op}: W must have Q's dtype {Q.dtype}, got {W.dtype}")
    if W.device != Q.device:
        raise ValueError(f"{op}: W must be on Q's device {Q.device}, got {W.device}")
