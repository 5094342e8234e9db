"""Python entry to every op: the compiled kernels when they are built, else the pure-torch reference.

The ops always exist as ``torch.ops.landscape_kernels.<name>``: the C++ extension defines them when it
loads; otherwise this module defines the same schemas and registers the reference as their kernel, and
it registers the reference for any device the build has no kernels for (e.g. CUDA tensors with a
CPU-only build). ``LANDSCAPE_KERNELS_BACKEND=reference`` (or ``use_backend("reference")``) makes the
wrappers below skip the compiled kernels at run time; ``compiled`` makes a missing kernel an error.

The wrappers validate their arguments (shape, dtype, device, finiteness) with errors that name the
argument; the raw ``torch.ops`` entries only check shapes, dtypes and devices. The ops are not
differentiable: they compute statistics of gradients already taken.
"""
import contextlib
import importlib.util
import os
import re
import threading

import torch

from . import checks, reference

NAMESPACE = "landscape_kernels"
SCHEMA_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas.def")


def read_schemas(path=SCHEMA_TABLE):
    """{op name: schema} from the table the C++ extension compiles in (``LK_OP(name, "schema")`` lines)."""
    with open(path) as f:
        rows = re.findall(r'^LK_OP\((\w+),\s*"([^"]*)"\)\s*$', f.read(), re.M)
    if not rows:
        raise RuntimeError(f"{path}: no LK_OP(name, \"schema\") lines; the package is damaged")
    return dict(rows)


SCHEMAS = read_schemas()
BACKENDS = ("auto", "compiled", "reference")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load_extension():
    """(module, None) when the compiled extension loads, else (None, why): a missing or broken build
    must not break the package."""
    try:
        from . import _C  # loading it registers the compiled ops

        return _C, None
    except Exception as exc:
        try:
            built = importlib.util.find_spec(f"{__package__}._C") is not None
        except (ImportError, ValueError, AttributeError):
            built = False
        if not built:
            return None, ("not built (installed with LANDSCAPE_KERNELS_NO_EXT=1, or where torch was not importable at "
                          "build time, e.g. under pip's build isolation: reinstall with "
                          "`pip install --no-build-isolation .` for the compiled kernels)")
        return None, f"{type(exc).__name__}: {exc}"


_C, EXTENSION_ERROR = _load_extension()


def _has_compiled_kernel(name, device_key):
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", device_key)


# Which (op, device key) pairs the C++ build provides, read before the reference is registered anywhere.
_COMPILED = {(name, key) for name in SCHEMAS for key in _DEVICE_KEYS.values() if _has_compiled_kernel(name, key)}


def _register():
    libs = []
    if _C is None:
        lib = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
            lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
        libs.append(lib)
    else:
        lib = torch.library.Library(NAMESPACE, "IMPL")
        for name in SCHEMAS:
            for key in _DEVICE_KEYS.values():
                if (name, key) not in _COMPILED:
                    lib.impl(name, getattr(reference, name), key)
        libs.append(lib)
    return libs


_LIBS = _register()  # kept alive: dropping a Library unregisters its kernels


# The fake (meta) kernels check what the real ones check that does not read values (shapes, dtypes,
# devices): a call mixing a meta tensor with a real one dispatches here, and must be refused, not answered
# with an uninitialised tensor.
@torch.library.register_fake(f"{NAMESPACE}::per_sample_sq_norms")
def _(A, D):
    checks.check_layer_pair(A, D, "per_sample_sq_norms")
    return A.new_empty(A.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_gram")
def _(A, D):
    checks.check_layer_pair(A, D, "per_sample_gram")
    return A.new_empty(A.shape[0], A.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_moments")
def _(A, D):
    checks.check_layer_pair(A, D, "per_sample_moments")
    return A.new_empty(D.shape[-1], A.shape[-1]), A.new_empty(D.shape[-1], A.shape[-1])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_project")
def _(A, D, V):
    _, _, n_in, n_out = checks.check_layer_pair(A, D, "per_sample_project")
    checks.check_directions(V, A, n_out, n_in, "per_sample_project")
    return A.new_empty(A.shape[0], V.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_cov_matvec")
def _(A, D, V):
    _, _, n_in, n_out = checks.check_layer_pair(A, D, "per_sample_cov_matvec")
    checks.check_directions(V, A, n_out, n_in, "per_sample_cov_matvec")
    return A.new_empty(V.shape[0], D.shape[-1], A.shape[-1])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_weighted_sum")
def _(A, D, W):
    B = checks.check_layer_pair(A, D, "per_sample_weighted_sum")[0]
    checks.check_weights(W, A, B, "per_sample_weighted_sum")
    return A.new_empty(W.shape[1], D.shape[-1], A.shape[-1])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_stats")
def _(A, D):
    checks.check_layer_pair(A, D, "per_sample_stats")
    B = A.shape[0]
    return A.new_empty(B), A.new_empty(B, B), A.new_empty(D.shape[-1], A.shape[-1]), A.new_empty(D.shape[-1], A.shape[-1])


@torch.library.register_fake(f"{NAMESPACE}::per_sample_stats_about")
def _(A, D, M):
    B, _, n_in, n_out = checks.check_layer_pair(A, D, "per_sample_stats_about")
    checks.check_centre(M, A, n_out, n_in, "per_sample_stats_about")
    return A.new_empty(B), A.new_empty(B, B), A.new_empty(n_out, n_in), A.new_empty(n_out, n_in)


@torch.library.register_fake(f"{NAMESPACE}::lanczos_reorth")
def _(Q, W, j):
    checks.check_reorth(Q, W, j)
    return W.new_empty(W.shape), W.new_empty(W.shape[:2])


@torch.library.register_fake(f"{NAMESPACE}::trajectory_cov_update")
def _(M2, mean, count, X):
    checks.check_cov_update(M2, mean, count, X)
    return None


@torch.library.register_fake(f"{NAMESPACE}::profile_ce_losses")
def _(z0, zd, direction, offset, weight, bias, target):
    checks.check_profile(z0, zd, direction, offset, weight, bias, target, values=False)
    return z0.new_empty(direction.shape[0], dtype=torch.float64)


@torch.library.register_fake(f"{NAMESPACE}::trajectory_project")
def _(X, mean, basis):
    checks.check_project(X, mean, basis)
    return X.new_empty(X.shape[0], basis.shape[0], dtype=torch.float64), X.new_empty(X.shape[0], dtype=torch.float64)


_override = threading.local()


def backend_setting():
    """The requested backend: ``use_backend`` if active, else $LANDSCAPE_KERNELS_BACKEND, else 'auto'."""
    value = getattr(_override, "value", None) or os.environ.get("LANDSCAPE_KERNELS_BACKEND", "auto")
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"LANDSCAPE_KERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name):
    """Force 'reference', 'compiled' or 'auto' inside a ``with`` block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_override, "value", None)
    _override.value = name
    try:
        yield
    finally:
        _override.value = previous


def compiled_devices():
    """Device types ('cpu', 'cuda') for which every op has a compiled kernel."""
    return [d for d, key in _DEVICE_KEYS.items() if all((n, key) in _COMPILED for n in SCHEMAS)]


def active_backend(device):
    """'compiled' or 'reference': what the wrappers use for tensors on ``device`` right now."""
    device = torch.device(device)
    compiled = device.type in compiled_devices()
    setting = backend_setting()
    if setting == "compiled" and not compiled:
        raise RuntimeError(
            f"LANDSCAPE_KERNELS_BACKEND=compiled but there are no compiled kernels for {device.type} "
            f"(extension: {EXTENSION_ERROR or 'built without ' + device.type.upper() + ' kernels'})"
        )
    return "compiled" if compiled and setting != "reference" else "reference"


def _call(name, A, *args):
    if active_backend(A.device) == "reference":
        return getattr(reference, name)(A, *args)
    return getattr(getattr(torch.ops, NAMESPACE), name)(A, *args)


def _checked_pair(A, D, op, finite):
    layout = checks.check_layer_pair(A, D, op)
    if finite:
        checks.check_finite(A, "A", op)
        checks.check_finite(D, "D", op)
    return layout


def _checked_directions(A, D, V, op, finite):
    _, _, n_in, n_out = _checked_pair(A, D, op, finite)
    checks.check_directions(V, A, n_out, n_in, op)
    if finite:
        checks.check_finite(V, "V", op)


def per_sample_sq_norms(A, D, *, check_finite=True):
    """(B,) squared Frobenius norms ||G_b||^2 of the per-sample gradients G_b = sum_t D[b,t]^T A[b,t]."""
    _checked_pair(A, D, "per_sample_sq_norms", check_finite)
    return _call("per_sample_sq_norms", A, D)


def per_sample_gram(A, D, *, check_finite=True):
    """(B, B) Gram matrix <G_b, G_c> of the per-sample gradients."""
    _checked_pair(A, D, "per_sample_gram", check_finite)
    return _call("per_sample_gram", A, D)


def per_sample_moments(A, D, *, check_finite=True):
    """(mean, var), each (out, in): batch mean and population variance (divided by B) of each element of
    G_b — the diagonal of the per-sample covariance C_1 (docs/methods.md). Computed in two passes."""
    _checked_pair(A, D, "per_sample_moments", check_finite)
    return _call("per_sample_moments", A, D)


def per_sample_project(A, D, V, *, check_finite=True):
    """(B, K) projections <G_b, V_k> on K directions V of shape (K, out, in)."""
    _checked_directions(A, D, V, "per_sample_project", check_finite)
    return _call("per_sample_project", A, D, V)


def per_sample_cov_matvec(A, D, V, *, check_finite=True):
    """(K, out, in) products C_1 V_k, C_1 = (1/B) sum_b (G_b - mean)(G_b - mean)^T (the per-sample
    covariance; divide by the SGD batch size yourself for the minibatch-noise covariance C_B)."""
    _checked_directions(A, D, V, "per_sample_cov_matvec", check_finite)
    return _call("per_sample_cov_matvec", A, D, V)


def per_sample_weighted_sum(A, D, W, *, check_finite=True):
    """(K, out, in) weighted sums sum_b W[b, k] G_b of the per-sample gradients, W of shape (B, K)."""
    B = _checked_pair(A, D, "per_sample_weighted_sum", check_finite)[0]
    checks.check_weights(W, A, B, "per_sample_weighted_sum")
    if check_finite:
        checks.check_finite(W, "W", "per_sample_weighted_sum")
    return _call("per_sample_weighted_sum", A, D, W)


def per_sample_stats(A, D, *, check_finite=True):
    """(sq_norms, gram, mean, var) in one call; for T > 1 each tile of per-sample gradients is built
    once for all four (the separate ops would build it up to three times)."""
    _checked_pair(A, D, "per_sample_stats", check_finite)
    return _call("per_sample_stats", A, D)


def per_sample_stats_about(A, D, M, *, check_finite=True):
    """``per_sample_stats`` with M (out, in), a centre close to the batch mean such as the gradient
    autograd computed: for one position per sample (T = 1) the mean then comes out of the variance pass
    (M plus the mean deviation from it) instead of a GEMM of its own. Same results up to rounding; a
    centre far from the mean costs precision (the deviations about it cancel). For T > 1, M is not read."""
    _, _, n_in, n_out = _checked_pair(A, D, "per_sample_stats_about", check_finite)
    checks.check_centre(M, A, n_out, n_in, "per_sample_stats_about")
    if check_finite:
        checks.check_finite(M, "M", "per_sample_stats_about")
    return _call("per_sample_stats_about", A, D, M)


def lanczos_reorth(Q, W, j):
    """Full reorthogonalisation for C Lanczos chains: each chain's new vectors W[c] (b, P) against the
    first j vectors of its basis Q[c] (m, P), classical Gram-Schmidt applied twice. Returns (W', norms
    (C, b)). Block Lanczos is C = 1, b = block size; independent chains (SLQ probes) are b = 1."""
    checks.check_reorth(Q, W, j)
    return _call("lanczos_reorth", Q, W, j)


def trajectory_cov_update(M2, mean, count, X, *, check_finite=True):
    """Merge the snapshots X (T, N) (float32 or float64) into running float64 statistics of ``count``
    earlier snapshots, in place: ``mean`` (N,) and ``M2`` (N, N), the sum of (x - mean)(x - mean)^T
    (Chan et al.'s parallel update, the mean shift as a rank-one correction; covariance = M2 / (n - 1))."""
    checks.check_cov_update(M2, mean, count, X)
    if check_finite:
        checks.check_finite(X, "X", "trajectory_cov_update")
    _call("trajectory_cov_update", M2, mean, count, X)


def trajectory_project(X, mean, basis, *, check_finite=True):
    """(proj (T, k), residual (T,)), float64: the centred snapshots X - mean projected on the rows of
    ``basis`` (k, N), taken as orthonormal, and the norm of the part of each the basis misses (formed
    explicitly, accurate even when the basis captures almost everything)."""
    checks.check_project(X, mean, basis)
    if check_finite:
        checks.check_finite(X, "X", "trajectory_project")
    return _call("trajectory_project", X, mean, basis)


def profile_ce_losses(z0, zd, direction, offset, weight, bias, target, *, check_finite=True):
    """(M,) float64: for every point m, the cross-entropy summed over the R rows of
    ``weight @ relu(z0 + offset[m] * zd[direction[m]]) + bias`` against ``target`` (Feng & Tu 2021 loss
    profiles when the layer before a ReLU and a final Linear layer moves: its output is z0 (R, H) at
    theta0 and moves by delta * zd[u] (U, R, H) along direction u). Never forms the M x R x H tensor."""
    checks.check_profile(z0, zd, direction, offset, weight, bias, target)
    if check_finite:
        for t, name in ((z0, "z0"), (zd, "zd"), (offset, "offset"), (weight, "weight")):
            checks.check_finite(t, name, "profile_ce_losses")
        if bias is not None:
            checks.check_finite(bias, "bias", "profile_ce_losses")
    return _call("profile_ce_losses", z0, zd, direction, offset, weight, bias, target)
