"""Every per-sample op against its float64 reference on fresh random inputs, plus opcheck and bad input."""
import pytest
import torch

from landscape_kernels import ops, reference
from testing import (DEVICE_BACKENDS, DEVICES, DTYPES, assert_close, batch_mean_centre, per_sample_op_args, randn,
                     zero_variance_floor)

OPS = ["per_sample_sq_norms", "per_sample_gram", "per_sample_moments", "per_sample_project",
       "per_sample_cov_matvec", "per_sample_weighted_sum", "per_sample_stats", "per_sample_stats_about"]

# (B, T, in, out); T None means 2-D inputs. Chosen to take every route of the kernels: T = 1, the Gram
# and the direct forms for T > 1, projections through the smaller of in / out, scaling of A or of D.
SHAPES = [
    (1, None, 1, 1), (7, None, 13, 5), (33, None, 300, 70), (3, None, 2, 600), (5, None, 1, 9),
    (4, 1, 6, 3), (6, 5, 40, 30), (5, 40, 3, 4), (2, 17, 1, 11), (9, 3, 11, 1),
]


def make_inputs(shape, K, dtype, device, gen, contiguous):
    B, T, n_in, n_out = shape
    lead = (B,) if T is None else (B, T)
    A = randn(*lead, n_in, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    D = randn(*lead, n_out, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    V = randn(K, n_out, n_in, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    W = randn(B, K, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    return A, D, V, W


def oracle(name, args):
    out = getattr(reference, name)(*[a.detach().double().cpu() for a in args])
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_match_float64_reference(shape, contiguous, dtype, device, backend, gen):
    A, D, V, W = make_inputs(shape, 3, dtype, device, gen, contiguous)
    with ops.use_backend(backend):
        for name in OPS:
            args = per_sample_op_args(name, A, D, V, W)
            out = getattr(ops, name)(*args)
            out = out if isinstance(out, tuple) else (out,)
            for o, r in zip(out, oracle(name, args)):
                assert o.dtype == dtype and o.device.type == device and o.shape == r.shape, name
                assert_close(o, r, dtype, what=f"{name} {shape}")


@pytest.mark.parametrize("device", DEVICES)
def test_tiled_paths_large_layer(device, gen):
    # B * out * in above the kernels' tile budget: the T > 1 variance runs over several tiles.
    A, D, V, W = make_inputs((64, 3, 300, 300), 2, torch.float64, device, gen, True)
    for name in ["per_sample_moments", "per_sample_sq_norms", "per_sample_gram", "per_sample_cov_matvec", "per_sample_stats"]:
        args = per_sample_op_args(name, A, D, V, W)
        out = getattr(ops, name)(*args)
        for o, r in zip(out if isinstance(out, tuple) else (out,), oracle(name, args)):
            assert_close(o, r, torch.float64, what=name)


def mean_dwarfing_spread(dtype, T, device, gen):
    """(A, D) of 50 samples (T positions, or 2-D for None) whose per-sample gradients have mean ~1 and
    spread ~1e-4."""
    B, n_in, n_out = 50, 37, 9
    lead = (B,) if T is None else (B, T)
    a0 = torch.rand(n_in, dtype=torch.float64, generator=gen) + 0.5
    d0 = torch.rand(n_out, dtype=torch.float64, generator=gen) + 0.5
    A = (a0 + 1e-4 * torch.randn(*lead, n_in, dtype=torch.float64, generator=gen)).to(dtype).to(device)
    D = (d0 + 1e-4 * torch.randn(*lead, n_out, dtype=torch.float64, generator=gen)).to(dtype).to(device)
    return A, D


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("T", [None, 4], ids=["T1", "T4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_stable_when_mean_dwarfs_spread(dtype, T, device, backend, gen):
    # Per-sample gradients with mean ~1 and spread ~1e-4: E[G^2] - E[G]^2 would lose ~8 digits.
    A, D = mean_dwarfing_spread(dtype, T, device, gen)
    mean_ref, var_ref = oracle("per_sample_moments", (A, D))
    assert float(mean_ref.abs().mean() / var_ref.sqrt().mean()) > 1e3
    with ops.use_backend(backend):
        mean, var = ops.per_sample_moments(A, D)
    # float32 with T > 1: each per-sample element is a float32 sum of T products, whose rounding
    # (~1e-7 of the mean = ~1e-3 of the spread) is part of the input to the variance.
    factor = 100.0 if (dtype == torch.float32 and T is not None) else 1.0
    assert_close(mean, mean_ref, dtype, what="mean")
    assert_close(var, var_ref, dtype, factor=factor, what="variance")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("T", [None, 4], ids=["T1", "T4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_about_a_centre_match_stats_when_the_mean_dwarfs_the_spread(dtype, T, device, backend, gen):
    # the centre as autograd would give it (rounded to the dtype), and one off by 1e-3 of the spread
    A, D = mean_dwarfing_spread(dtype, T, device, gen)
    ref = oracle("per_sample_stats", (A, D))
    factor = 100.0 if (dtype == torch.float32 and T is not None) else 1.0  # as for per_sample_moments above
    M = batch_mean_centre(A, D)
    for centre in (M, M + 1e-7 * torch.randn(M.shape, dtype=dtype, generator=gen).to(device)):
        with ops.use_backend(backend):
            out = ops.per_sample_stats_about(A, D, centre)
        for o, r, what in zip(out, ref, ("sq_norms", "gram", "mean", "variance")):
            assert_close(o, r, dtype, factor=factor if what == "variance" else 1.0, what=what)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("T", [None, 3], ids=["T1", "T3"])
@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_of_identical_samples_is_zero(dtype, B, T, device, backend, gen):
    # every sample the same: the variance is 0, not the square of the mean's rounding (which a variance
    # centred on a mean rounded to float32 would give: ~(6e-8 * 1e11)^2 here)
    lead = (1,) if T is None else (1, T)
    A = (1e6 * torch.randn(*lead, 13, dtype=dtype, generator=gen)).expand(B, *lead[1:], 13).to(device)
    D = (1e5 * torch.randn(*lead, 5, dtype=dtype, generator=gen)).expand(B, *lead[1:], 5).to(device)
    with ops.use_backend(backend):
        mean, var = ops.per_sample_moments(A, D)
        stats_var = ops.per_sample_stats(A, D)[3]
        about_var = ops.per_sample_stats_about(A, D, batch_mean_centre(A, D))[3]
    floor = zero_variance_floor(mean, dtype)
    assert (var.double().abs() <= floor).all() and (stats_var.double().abs() <= floor).all()
    assert (about_var.double().abs() <= floor).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, None, 7, 3), (3, 4, 6, 5)], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, shape, device, gen):
    A, D, V, W = make_inputs(shape, 2, torch.float64, device, gen, True)
    torch.library.opcheck(getattr(torch.ops.landscape_kernels, name).default, per_sample_op_args(name, A, D, V, W))


def test_raw_ops_check_their_arguments():
    # the C++ kernels raise what the reference raises (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE)
    with pytest.raises(ValueError, match="M \\(the centre\\) must have shape"):
        torch.ops.landscape_kernels.per_sample_stats_about(torch.randn(4, 3), torch.randn(4, 2), torch.randn(3, 2))
    A, D = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="same batch size"):
        torch.ops.landscape_kernels.per_sample_gram(A, D)
    with pytest.raises(ValueError, match="V \\(directions\\) must have shape"):
        torch.ops.landscape_kernels.per_sample_project(A, torch.randn(4, 2), torch.randn(2, 3, 3))


def _bad_inputs():
    A, D, V, W = torch.randn(4, 3), torch.randn(4, 2), torch.randn(2, 2, 3), torch.randn(4, 2)
    nan = A.clone()
    nan[1, 2] = float("nan")
    inf = D.clone()
    inf[0, 0] = float("inf")
    return [
        ("per_sample_gram", (A, torch.randn(5, 2)), ValueError, "same batch size"),
        ("per_sample_gram", (A[0], D[0]), ValueError, "A \\(layer inputs\\) must have shape"),
        ("per_sample_gram", (A, D.unsqueeze(1)), ValueError, "same rank"),
        ("per_sample_gram", (A.unsqueeze(1), torch.randn(4, 2, 2)), ValueError, "positions T"),
        ("per_sample_sq_norms", (A, D.double()), TypeError, "D must have A's dtype"),
        ("per_sample_sq_norms", (A.long(), D.long()), TypeError, "float32 or float64"),
        ("per_sample_sq_norms", (A, "D"), TypeError, "D must be a torch.Tensor"),
        ("per_sample_moments", (nan, D), ValueError, "A contains 1 NaN/Inf"),
        ("per_sample_moments", (A, inf), ValueError, "D contains 1 NaN/Inf"),
        ("per_sample_moments", (A[:0], D[:0]), ValueError, "empty batch"),
        ("per_sample_moments", (A, D[:, :0]), ValueError, "non-empty last dimension"),
        ("per_sample_project", (A, D, torch.randn(2, 3, 2)), ValueError, "V \\(directions\\) must have shape"),
        ("per_sample_project", (A, D, V[:0]), ValueError, "K = 0"),
        ("per_sample_project", (A, D, V.double()), TypeError, "V must have A's dtype"),
        ("per_sample_cov_matvec", (A, D, V.reshape(2, 6)), ValueError, "V \\(directions\\)"),
        ("per_sample_weighted_sum", (A, D, W[:3]), ValueError, "W \\(weights\\) must have shape"),
        ("per_sample_weighted_sum", (A, D, W.double()), TypeError, "W must have A's dtype"),
        ("per_sample_gram", (A, D.to("meta")), ValueError, "D must be on A's device cpu, got meta"),
        ("per_sample_project", (A, D, V.to("meta")), ValueError, "V must be on A's device"),
        ("per_sample_stats_about", (A, D, torch.randn(3, 2)), ValueError, "M \\(the centre\\) must have shape"),
        ("per_sample_stats_about", (A, D, torch.randn(2, 3).double()), TypeError, "M must have A's dtype"),
        ("per_sample_stats_about", (A, D, torch.full((2, 3), float("nan"))), ValueError, "M contains 6 NaN/Inf"),
    ]


@pytest.mark.parametrize("name,args,exc,match", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(name, args, exc, match):
    with pytest.raises(exc, match=match):
        getattr(ops, name)(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_rejected():
    A, D = torch.randn(4, 3), torch.randn(4, 2, device="cuda")
    with pytest.raises(ValueError, match="D must be on A's device"):
        ops.per_sample_gram(A, D)


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("LANDSCAPE_KERNELS_BACKEND", "reference")
    assert ops.active_backend("cpu") == "reference"
    monkeypatch.setenv("LANDSCAPE_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LANDSCAPE_KERNELS_BACKEND must be one of"):
        ops.active_backend("cpu")
    monkeypatch.delenv("LANDSCAPE_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="use_backend"):
        with ops.use_backend("fast"):
            pass
