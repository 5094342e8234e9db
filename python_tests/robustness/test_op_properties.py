"""Property-based tests (hypothesis): every op, on every available device and backend, agrees with its
float64 reference over random shapes (odd sizes, single rows, T = 1 or none), dtypes, memory layouts
(contiguous, strided, transposed, stride 0, a storage offset) and values (Gaussian, one sign, small
integers, mostly zeros, over many orders of magnitude); its fake kernel gives the real output's shapes
and dtypes.

Accuracy contract: ``||op - ref64|| / ||ref64||`` within ``TOL[dtype]`` or, on an ill-conditioned draw
(a result that cancels: a loss near zero, a centred sum of nearly equal samples, a vector already in
the basis), within ``SLACK`` times the larger of two measures of what the input's precision allows:
the error of the reference evaluated in the input's dtype, and the change of the float64 result when
every input moves by one rounding (a relative 2^-24 or 2^-53). A kernel bug (a wrong path, stride or
uninitialised memory) is off by orders of magnitude more than either.

Settings (``conftest.py``): the default profile runs a bounded, derandomised set of examples per test
(the same every run, so CI is reproducible); ``HYPOTHESIS_PROFILE=thorough`` runs many more, freshly
random, and prints the seed of any failure (docs/reliability.md).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from landscape_kernels import ops, reference
from testing import DEVICE_BACKENDS, TOL, per_sample_op_args, rel_err, zero_variance_floor

RAW = torch.ops.landscape_kernels
PER_SAMPLE_OPS = ["per_sample_sq_norms", "per_sample_gram", "per_sample_moments", "per_sample_project",
                  "per_sample_cov_matvec", "per_sample_weighted_sum", "per_sample_stats"]
LAYOUTS = ["contiguous", "strided", "transposed", "stride0", "offset"]
DISTRIBUTIONS = ["normal", "positive", "integers", "sparse"]
dtypes = st.sampled_from([torch.float32, torch.float64])
scales = st.sampled_from([2.0 ** -20, 2.0 ** -6, 1.0, 2.0 ** 6, 2.0 ** 20])


def values(shape, distribution, scale, dtype, gen):
    """Fresh float64 values of one kind, rounded to ``dtype``."""
    if distribution == "normal":
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
    elif distribution == "positive":  # one sign: means dwarf spreads, sums do not cancel
        x = torch.rand(shape, dtype=torch.float64, generator=gen) + 0.5
    elif distribution == "integers":  # small integers: every product and sum exact
        x = torch.randint(-3, 4, shape, generator=gen).double()
    else:  # mostly zeros
        x = torch.randn(shape, dtype=torch.float64, generator=gen) * (torch.rand(shape, generator=gen) < 0.2)
    return (x * scale).to(dtype)


def laid_out(x, layout):
    """``x`` (same values) in the memory layout ``layout``: a view whose strides are not the contiguous ones.
    stride0 repeats the first entry of the last dimension (a broadcast), so its values change."""
    if layout == "strided":
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "stride0":
        return x[..., :1].expand(x.shape)
    if layout == "offset":
        flat = torch.zeros(x.numel() + 3, dtype=x.dtype)
        flat[3:] = x.reshape(-1)
        return flat[3:].view(x.shape)
    return x


@st.composite
def tensors(draw, shape, dtype, gen):
    x = values(shape, draw(st.sampled_from(DISTRIBUTIONS)), draw(scales), dtype, gen)
    return laid_out(x, draw(st.sampled_from(LAYOUTS)))


@st.composite
def generators(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def on(device, *tensors_):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors_]


def as_oracle(t):
    """A float64 CPU copy of a floating tensor (other arguments as they are)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu()
    return t


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


SLACK = 8


def one_rounding_apart(args, dtype):
    """Float64 copies of the arguments, each floating entry moved by a random relative rounding of ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    unit = torch.finfo(dtype).eps / 2

    def move(t):
        t = as_oracle(t)
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        return t * (1 + unit * (2 * torch.rand(t.shape, dtype=torch.float64, generator=gen) - 1))

    return [move(a) for a in args]


def allowed_errors(op, args, exact, dtype, in_dtype=None):
    """Per output: TOL[dtype], or SLACK x what the input precision allows where that is larger (see the
    module docstring). ``in_dtype``: the outputs evaluated in the input's dtype (default: ``op`` on the
    arguments as they are)."""
    if in_dtype is None:
        in_dtype = as_tuple(op(*[a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args]))
    moved = as_tuple(op(*one_rounding_apart(args, dtype)))
    return [max(TOL[dtype], SLACK * max(rel_err(a, r), rel_err(b, r))) for a, b, r in zip(in_dtype, moved, exact)]


# (variance output, its mean output) of the ops that return a variance
VARIANCE_OF_MEAN = {"per_sample_moments": (1, 0), "per_sample_stats": (3, 2)}


def assert_as_accurate_as_the_input_allows(name, args, out, dtype, denominator=None):
    """``denominator``: the norm errors are measured against where the result may cancel to nothing
    (default: the reference's own norm)."""
    op = getattr(reference, name)
    exact = as_tuple(op(*[as_oracle(a) for a in args]))
    out = [o.detach().cpu().double() for o in as_tuple(out)]
    if name in VARIANCE_OF_MEAN:
        out = assert_zero_variance_where_samples_agree(out, exact, dtype, *VARIANCE_OF_MEAN[name])
    allowed = allowed_errors(op, args, exact, dtype)
    for k, (o, r, bound) in enumerate(zip(out, exact, allowed)):
        assert o.shape == r.shape, f"{name} output {k}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{name} output {k}: non-finite values"
        err = rel_err(o, r) if denominator is None else float((o - r).norm()) / denominator
        assert err <= bound, f"{name} output {k}: relative error {err:.2e} > {bound:.2e}"


def assert_zero_variance_where_samples_agree(out, exact, dtype, var_k, mean_k):
    """Where every sample's gradient element is the same (one sample, or repeated inputs) the variance is
    0 (within ``zero_variance_floor``). Those entries are then left out of the relative check, whose scale
    they do not share."""
    zero = exact[var_k] == 0
    floor = zero_variance_floor(exact[mean_k][zero], dtype)
    worst = out[var_k][zero].abs()
    assert (worst <= floor).all(), f"variance of identical samples {float(worst.max()):.3e}, not zero"
    out = list(out)
    out[var_k] = torch.where(zero, exact[var_k], out[var_k])
    return out


def assert_fake_matches(name, args, out):
    """The fake (meta) kernel returns the real output's shapes and dtypes."""
    fake = as_tuple(getattr(RAW, name)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]))
    for f, o in zip(fake, as_tuple(out)):
        assert (f.shape, f.dtype) == (o.shape, o.dtype), f"{name}: fake {f.shape} {f.dtype}, real {o.shape} {o.dtype}"


# ----------------------------------------------------------------------------------- per-sample ops
@st.composite
def layer_inputs(draw):
    """(A, D, V, W) of one layer: (B, [T,] in), (B, [T,] out), K directions (K, out, in), weights (B, K)."""
    gen, dtype = draw(generators()), draw(dtypes)
    B, n_in, n_out, K = (draw(st.integers(1, hi)) for hi in (24, 40, 40, 4))
    T = draw(st.one_of(st.none(), st.integers(1, 9)))
    lead = (B,) if T is None else (B, T)
    A = draw(tensors(lead + (n_in,), dtype, gen))
    D = draw(tensors(lead + (n_out,), dtype, gen))
    V = draw(tensors((K, n_out, n_in), dtype, gen))
    W = draw(tensors((B, K), dtype, gen))
    return A, D, V, W, dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", PER_SAMPLE_OPS)
@given(inputs=layer_inputs())
def test_per_sample_op_matches_reference(name, device, backend, inputs):
    *tensors_, dtype = inputs
    args = on(device, *per_sample_op_args(name, *tensors_))
    with ops.use_backend(backend):
        out = getattr(ops, name)(*args)
    assert all(o.dtype == dtype and o.device.type == device for o in as_tuple(out))
    assert_as_accurate_as_the_input_allows(name, args, out, dtype)
    assert_fake_matches(name, args, out)


# ----------------------------------------------------------------------------------- Lanczos
@st.composite
def reorth_inputs(draw):
    """An orthonormal basis Q (C, m, P), new vectors W (C, b, P) and the basis vectors in use j."""
    gen, dtype = draw(generators()), draw(dtypes)
    C, b, P = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 60))
    m = draw(st.integers(1, P))
    Q = torch.linalg.qr(torch.randn(C, P, m, dtype=torch.float64, generator=gen)).Q.transpose(1, 2).to(dtype)
    Q = laid_out(Q, draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"])))
    return Q, draw(tensors((C, b, P), dtype, gen)), draw(st.integers(0, m)), dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(inputs=reorth_inputs())
def test_lanczos_reorth_matches_reference(device, backend, inputs):
    Q, W, j, dtype = inputs
    args = on(device, Q, W, j)
    with ops.use_backend(backend):
        out = ops.lanczos_reorth(*args)
    # errors against the new vectors' norm: what is left of a vector already in the basis is rounding
    assert_as_accurate_as_the_input_allows("lanczos_reorth", args, out, dtype, denominator=max(float(W.norm()), 1e-300))
    assert_fake_matches("lanczos_reorth", args, out)
    if dtype == torch.float64 and j:  # what is left is orthogonal to the basis in use
        w = out[0].cpu()
        overlap = (Q[:, :j] @ w.transpose(1, 2)).norm()
        assert overlap <= 1e-12 * max(float(W.norm()), 1e-300)


# ----------------------------------------------------------------------------------- trajectory ops
@st.composite
def cov_update_inputs(draw):
    """Running statistics of ``count`` earlier snapshots (from the reference) and a new chunk X (T, N)."""
    gen, dtype = draw(generators()), draw(dtypes)
    N, T, count = draw(st.integers(1, 40)), draw(st.integers(1, 12)), draw(st.integers(0, 12))
    M2, mean = torch.zeros(N, N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    if count:
        reference.trajectory_cov_update(M2, mean, 0, draw(tensors((count, N), dtype, gen)))
    return M2, mean, count, draw(tensors((T, N), dtype, gen)), dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(inputs=cov_update_inputs())
def test_trajectory_cov_update_matches_reference(device, backend, inputs):
    M2, mean, count, X, dtype = inputs
    M2_ref, mean_ref = M2.clone(), mean.clone()
    reference.trajectory_cov_update(M2_ref, mean_ref, count, X.double())
    M2_dev, mean_dev, X_dev = on(device, M2, mean, X)
    fake = RAW.trajectory_cov_update(M2.to("meta"), mean.to("meta"), count, X.to("meta"))
    with ops.use_backend(backend):
        ops.trajectory_cov_update(M2_dev, mean_dev, count, X_dev)
    # the statistics are float64 whatever X is: float64 accuracy (the merge is stable). M2 sums
    # non-negative terms; the new mean may cancel (an old mean of -0.4 and a chunk that brings it to 0),
    # so its error is measured against the means it is made of
    mean_scale = max(float(mean_ref.norm()), float(mean.norm()), float(X.double().mean(0).norm()))
    for what, got, want, scale in (("M2", M2_dev, M2_ref, float(M2_ref.norm())), ("mean", mean_dev, mean_ref, mean_scale)):
        err = float((got.cpu() - want).norm()) / scale if scale > 0 else float(got.norm())
        assert err <= TOL[torch.float64], f"{what}: relative error {err:.2e}"
    assert torch.equal(M2_dev.cpu(), M2_dev.cpu().T), "M2 must stay exactly symmetric"
    assert fake is None


@st.composite
def project_inputs(draw):
    gen, dtype = draw(generators()), draw(dtypes)
    N, T = draw(st.integers(1, 50)), draw(st.integers(1, 12))
    k = draw(st.integers(1, N))
    basis = torch.linalg.qr(torch.randn(N, k, dtype=torch.float64, generator=gen)).Q.T
    basis = laid_out(basis, draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"])))
    mean = laid_out(values((N,), "normal", draw(scales), torch.float64, gen), draw(st.sampled_from(LAYOUTS)))
    return draw(tensors((T, N), dtype, gen)), mean, basis, dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(inputs=project_inputs())
def test_trajectory_project_matches_reference(device, backend, inputs):
    *args, dtype = inputs
    args = on(device, *args)
    with ops.use_backend(backend):
        out = ops.trajectory_project(*args)
    assert all(o.dtype == torch.float64 for o in out)
    assert_as_accurate_as_the_input_allows("trajectory_project", args, out, torch.float64)  # float64 arithmetic
    assert_fake_matches("trajectory_project", args, out)


# ----------------------------------------------------------------------------------- loss profiles
@st.composite
def profile_inputs(draw):
    gen, dtype = draw(generators()), draw(dtypes)
    R, H, U, M, C = (draw(st.integers(lo, hi)) for lo, hi in ((1, 40), (1, 24), (1, 3), (1, 12), (2, 9)))
    z0 = draw(tensors((R, H), dtype, gen))
    zd = draw(tensors((U, R, H), dtype, gen))
    direction = torch.randint(0, U, (M,), generator=gen)
    offset = values((M,), "normal", 3.0, dtype, gen)
    weight = draw(tensors((C, H), dtype, gen))
    bias = draw(st.one_of(st.none(), tensors((C,), dtype, gen)))
    target = torch.randint(0, C, (R,), generator=gen)
    return (z0, zd, direction, offset, weight, bias, target), dtype


def profile_in_dtype(args):
    """The same losses computed by PyTorch with the logits in the inputs' own dtype."""
    z0, zd, direction, offset, weight, bias, target = [a.cpu() if a is not None else None for a in args]
    h = torch.relu(z0[None] + offset[:, None, None] * zd[direction])
    logits = h @ weight.T + (bias if bias is not None else 0)
    M, R = h.shape[:2]
    return torch.nn.functional.cross_entropy(logits.reshape(M * R, -1).double(), target.repeat(M),
                                             reduction="none").reshape(M, R).sum(1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@given(inputs=profile_inputs())
def test_profile_ce_losses_matches_reference(device, backend, inputs):
    args, dtype = inputs
    args = on(device, *args)
    with ops.use_backend(backend):
        out = ops.profile_ce_losses(*args)
    assert out.dtype == torch.float64 and out.shape == (args[2].shape[0],)
    exact = reference.profile_ce_losses(*[as_oracle(a) for a in args])
    # a near-zero loss (a confidently right row) keeps only the digits its rounded logits carry
    (allowed,) = allowed_errors(reference.profile_ce_losses, args, (exact,), dtype, in_dtype=(profile_in_dtype(args),))
    err = rel_err(out, exact)
    assert err <= allowed, f"relative error {err:.2e} > {allowed:.2e}"
    assert_fake_matches("profile_ce_losses", args, out)
