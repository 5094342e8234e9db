"""The trajectory ops (covariance merge, centre-project-residual) against the float64 reference and
against statistics of the whole matrix computed directly; opcheck; bad input."""
import pytest
import torch

from landscape_kernels import ops, reference
from testing import DEVICE_BACKENDS, DEVICES, DTYPES, assert_close, randn

# (chunk sizes, N): N = 1100 crosses the 512-column blocks of the triangular product.
CHUNKINGS = [([1], 1), ([7], 13), ([1, 1, 1], 4), ([50, 3, 17], 600), ([3, 40], 1100), ([130], 37)]


def direct_statistics(X):
    Xd = X.double().cpu()
    mean = Xd.mean(0)
    return (Xd - mean).T @ (Xd - mean), mean


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("chunks,N", CHUNKINGS, ids=str)
def test_cov_update_merges_chunks_exactly(chunks, N, contiguous, dtype, device, backend, gen):
    X = randn(sum(chunks), N, dtype=dtype, device=device, generator=gen, contiguous=contiguous) * 3 + 2
    M2 = torch.zeros(N, N, dtype=torch.float64, device=device)
    mean = torch.zeros(N, dtype=torch.float64, device=device)
    M2_ref, mean_ref = M2.clone().cpu(), mean.clone().cpu()
    count = 0
    with ops.use_backend(backend):
        for rows in X.split(chunks):
            ops.trajectory_cov_update(M2, mean, count, rows)
            reference.trajectory_cov_update(M2_ref, mean_ref, count, rows.double().cpu())
            count += rows.shape[0]
    M2_direct, mean_direct = direct_statistics(X)
    tol = torch.float64  # the statistics are float64 whatever the snapshots' dtype
    assert_close(M2, M2_ref, tol, what="M2 vs reference")
    assert_close(mean, mean_ref, tol, what="mean vs reference")
    assert_close(M2, M2_direct, tol, what="M2 vs the whole matrix")
    assert_close(mean, mean_direct, tol, what="mean vs the whole matrix")
    assert torch.equal(M2, M2.T)  # both triangles written


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_cov_update_mean_dwarfing_the_spread(device, backend, gen):
    # float64 snapshots around 1e4 with unit spread: the merged variance keeps ~12 digits
    X = (1e4 + torch.randn(300, 20, dtype=torch.float64, generator=gen)).to(device)
    M2 = torch.zeros(20, 20, dtype=torch.float64, device=device)
    mean = torch.zeros(20, dtype=torch.float64, device=device)
    with ops.use_backend(backend):
        for i, rows in enumerate(X.split(37)):
            ops.trajectory_cov_update(M2, mean, 37 * i, rows)
    M2_direct, _ = direct_statistics(X - 1e4)  # the shift is exact in float64
    assert_close(M2, M2_direct, torch.float64, factor=100, what="M2")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("T,N,k", [(1, 1, 1), (9, 31, 0), (9, 31, 5), (40, 100_000, 3), (257, 70, 70)], ids=str)
def test_project_matches_reference(T, N, k, contiguous, dtype, device, backend, gen):
    X = randn(T, N, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    mean = torch.randn(N, dtype=torch.float64, generator=gen).to(device)
    basis = torch.linalg.qr(torch.randn(N, k, dtype=torch.float64, generator=gen))[0].T.contiguous().to(device)
    with ops.use_backend(backend):
        proj, residual = ops.trajectory_project(X, mean, basis)
    proj_ref, residual_ref = reference.trajectory_project(X.double().cpu(), mean.cpu(), basis.cpu())
    assert proj.shape == (T, k) and residual.shape == (T,) and proj.dtype == residual.dtype == torch.float64
    if k:
        assert_close(proj, proj_ref, torch.float64, what="proj")
    assert_close(residual, residual_ref, torch.float64, what="residual")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_project_residual_accurate_when_the_basis_captures_almost_everything(device, backend, gen):
    # snapshots in the span of the basis plus 1e-9 noise: sqrt(|c|^2 - |proj|^2) would return rounding noise
    basis = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64, generator=gen))[0].T.contiguous()
    coeff = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    noise = torch.randn(6, 50, dtype=torch.float64, generator=gen) * 1e-9
    noise -= (noise @ basis.T) @ basis
    X = (coeff @ basis + noise).to(device)
    with ops.use_backend(backend):
        _, residual = ops.trajectory_project(X, torch.zeros(50, dtype=torch.float64, device=device), basis.to(device))
    assert_close(residual, noise.norm(dim=1), torch.float64, factor=1e5, what="residual")  # 1e-5 relative


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    X = torch.randn(11, 23, generator=gen).to(device)
    M2 = torch.randn(23, 23, dtype=torch.float64, generator=gen).to(device)
    mean = torch.randn(23, dtype=torch.float64, generator=gen).to(device)
    basis = torch.randn(4, 23, dtype=torch.float64, generator=gen).to(device)
    torch.library.opcheck(torch.ops.landscape_kernels.trajectory_cov_update.default, (M2 @ M2.T, mean, 5, X))
    torch.library.opcheck(torch.ops.landscape_kernels.trajectory_project.default, (X, mean, basis))


def _stats(N=5):
    return torch.zeros(N, N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.trajectory_cov_update(*_stats(), 0, torch.randn(3, 4)), ValueError, r"M2 must have shape \(4, 4\)"),
    (lambda: ops.trajectory_cov_update(*_stats(), 0, torch.randn(3, 5, 1)), ValueError, r"X \(snapshots\) must have shape \(T, N\)"),
    (lambda: ops.trajectory_cov_update(*_stats(), 0, torch.randn(0, 5)), ValueError, "at least one snapshot"),
    (lambda: ops.trajectory_cov_update(*_stats(), -1, torch.randn(3, 5)), ValueError, "count"),
    (lambda: ops.trajectory_cov_update(_stats()[0], _stats()[1].float(), 0, torch.randn(3, 5)), TypeError, "mean must be float64"),
    (lambda: ops.trajectory_cov_update(*_stats(), 0, torch.randint(0, 3, (3, 5))), TypeError, "X must be float32 or float64"),
    (lambda: ops.trajectory_cov_update(*_stats(), 0, torch.tensor([[1.0, float("nan"), 0, 0, 0]])), ValueError, "X contains 1 NaN/Inf"),
    (lambda: ops.trajectory_project(torch.randn(3, 5), _stats()[1], torch.zeros(2, 4, dtype=torch.float64)), ValueError, r"basis must have shape \(k, N\) with N = 5"),
    (lambda: ops.trajectory_project(torch.randn(3, 5), torch.zeros(4, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)), ValueError, r"mean must have shape \(5,\)"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_raw_ops_check_their_arguments():
    with pytest.raises(ValueError, match=r"M2 must have shape \(N, N\)"):
        torch.ops.landscape_kernels.trajectory_cov_update(torch.zeros(3, 3, dtype=torch.float64),
                                                          torch.zeros(5, dtype=torch.float64), 0, torch.randn(2, 5))
    with pytest.raises(TypeError, match="basis must be float64"):
        torch.ops.landscape_kernels.trajectory_project(torch.randn(2, 5), torch.zeros(5, dtype=torch.float64),
                                                       torch.zeros(1, 5))
