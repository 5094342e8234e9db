"""StreamingPCA against numpy's SVD of the whole snapshot matrix on synthetic trajectories."""
import numpy as np
import pytest
import torch

from landscape_kernels.trajectory.pca import StreamingPCA, subspace_angles
from testing import rel_err


def trajectory(T, N, seed, offset=0.0, gamma=1.5):
    """Drift along one direction plus diffusion with a power-law spectrum (variance ~ i^-gamma)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(N, min(N, T), dtype=torch.float64, generator=g))[0]
    scales = torch.arange(1, basis.shape[1] + 1, dtype=torch.float64) ** (-gamma / 2)
    walk = torch.cumsum(torch.randn(T, basis.shape[1], dtype=torch.float64, generator=g), 0) * scales
    drift = torch.linspace(0, 5, T, dtype=torch.float64)[:, None] * basis[:, :1].T * 10
    return offset + drift + walk @ basis.T


def numpy_pca(X):
    Xd = X.double().numpy()
    centred = Xd - Xd.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return torch.from_numpy(s**2 / (X.shape[0] - 1)), torch.from_numpy(vt)


@pytest.mark.parametrize("mode,T,N", [("exact", 300, 40), ("exact", 60, 90), ("gram", 50, 400), ("gram", 120, 30)])
def test_exact_and_gram_match_numpy_svd(mode, T, N):
    X = trajectory(T, N, seed=1)
    k = min(T, N) - 1
    pca = StreamingPCA(n_components=k, mode=mode)
    for chunk in X.split([7, 1, T - 8]):
        pca.partial_fit(chunk)
    var, vt = numpy_pca(X)
    assert pca.n_samples_seen_ == T and pca.mode_ == mode
    assert pca.components_.shape == (k, N)
    assert rel_err(pca.explained_variance_, var[:k]) <= 1e-8
    top = 10  # well-separated leading components: subspace angles
    assert float(subspace_angles(pca.components_[:top], vt[:top]).max()) <= 1e-6
    assert torch.allclose(pca.explained_variance_ratio_, var[:k] / var.sum(), rtol=1e-8)
    assert torch.allclose(pca.mean_, X.mean(0), rtol=0, atol=1e-12)
    theta = pca.transform(X[:5])
    assert torch.allclose(theta, (X[:5] - X.mean(0)) @ pca.components_.T, atol=1e-9)


@pytest.mark.parametrize("mode", ["exact", "gram", "sketch"])
def test_chunk_order_and_sizes_do_not_change_the_result(mode):
    X = trajectory(200, 60, seed=2)
    results = []
    for sizes, order in [([200], None), ([13] * 15 + [5], None), ([50] * 4, [3, 1, 0, 2])]:
        chunks = list(X.split(sizes))
        if order:
            chunks = [chunks[i] for i in order]
        pca = StreamingPCA(n_components=5, mode=mode, sketch_size=60 if mode == "sketch" else None)
        for c in chunks:
            pca.partial_fit(c)
        results.append(pca)
    if mode == "sketch":  # Frequent Directions depends on the order, within its stated bound
        var, _ = numpy_pca(X)
        for pca in results:
            assert float((var[:5] - pca.explained_variance_).abs().max()) <= pca.sketch_error_bound_ + 1e-10 * float(var[0])
        return
    for other in results[1:]:
        assert rel_err(other.explained_variance_, results[0].explained_variance_) <= 1e-10
        assert float(subspace_angles(other.components_, results[0].components_).max()) <= 1e-7


@pytest.mark.parametrize("mode", ["exact", "gram"])
def test_large_mean_with_unit_spread_stays_accurate(mode):
    X = trajectory(150, 30, seed=3, offset=1e4)
    pca = StreamingPCA(n_components=10, mode=mode)
    for c in X.split(40):
        pca.partial_fit(c)
    var, _ = numpy_pca(X - 1e4)
    assert rel_err(pca.explained_variance_, var[:10]) <= 1e-8


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "offset1e3"])
def test_float32_precision_keeps_float32_accuracy(offset):
    """precision='float32': every variance within ~1e-6 of the largest, the leading directions as float32
    snapshots allow, whatever the chunking and a common offset of the weights."""
    X = trajectory(600, 80, seed=5, offset=offset).float()
    var, vt = numpy_pca(X)
    pca = StreamingPCA(n_components=40, mode="exact", precision="float32")
    for c in X.split([100, 37, 300, 163]):
        pca.partial_fit(c)
    assert pca.explained_variance_.dtype == torch.float64 and pca.components_.dtype == torch.float64
    assert float((pca.explained_variance_ - var[:40]).abs().max()) <= 2e-6 * float(var[0])
    assert rel_err(pca.explained_variance_[:5], var[:5]) <= 1e-5
    assert float(subspace_angles(pca.components_[:3], vt[:3]).max()) <= 1e-3
    assert torch.allclose(pca.mean_, X.double().mean(0), rtol=1e-12, atol=1e-9)
    assert abs(float(pca.explained_variance_ratio_.sum()) - float(var[:40].sum() / var.sum())) <= 1e-5


def test_sketch_within_its_stated_bound_and_float32_input():
    X = trajectory(400, 300, seed=4)
    var, vt = numpy_pca(X)
    pca = StreamingPCA(n_components=8, mode="sketch", sketch_size=40)
    for c in X.float().split(64):
        pca.partial_fit(c)
    bound = pca.sketch_error_bound_
    assert 0 < bound < 0.05 * float(var[0])
    err = (var[:8] - pca.explained_variance_).abs()
    assert float(err.max()) <= bound + 1e-4 * float(var[0])  # up to float32 input rounding
    assert float(subspace_angles(pca.components_[:2], vt[:2]).max()) <= 0.05
    assert abs(float(pca.explained_variance_ratio_.sum()) - float(var[:8].sum() / var.sum())) <= bound * 8 / float(var.sum()) + 1e-4


def test_auto_mode_choice():
    assert StreamingPCA().partial_fit(torch.randn(5, 30)).mode_ == "exact"
    assert StreamingPCA(memory_budget=1000).fit(torch.randn(5, 30)).mode_ == "gram"
    assert StreamingPCA(n_components=2, memory_budget=1000).partial_fit(torch.randn(5, 30)).mode_ == "sketch"


def test_bad_input():
    pca = StreamingPCA(n_components=3)
    with pytest.raises(RuntimeError, match="no snapshots yet"):
        _ = pca.components_
    pca.partial_fit(torch.randn(4, 10))
    with pytest.raises(ValueError, match="chunk has N = 9 parameters, earlier chunks had 10"):
        pca.partial_fit(torch.randn(4, 9))
    bad = torch.randn(4, 10)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 snapshot\\(s\\) with NaN/Inf .*after 4 snapshots merged"):
        pca.partial_fit(bad)
    assert pca.n_samples_seen_ == 4  # nothing from the bad chunk was merged
    with pytest.raises(ValueError, match="n_components = 5 exceeds min\\(T, N\\) = min\\(4, 10\\)"):
        _ = StreamingPCA(n_components=5).partial_fit(torch.randn(4, 10)).components_
    with pytest.raises(ValueError, match="mode must be one of"):
        StreamingPCA(mode="svd")
    with pytest.raises(ValueError, match="precision must be one of"):
        StreamingPCA(precision="half")
    with pytest.raises(ValueError, match="precision='float32' is a form of exact mode"):
        StreamingPCA(mode="sketch", n_components=2, precision="float32")
    with pytest.raises(ValueError, match="precision='float32' needs exact mode"):
        StreamingPCA(n_components=2, memory_budget=1000, precision="float32").partial_fit(torch.randn(5, 30))
    with pytest.raises(ValueError, match="sketch mode .* needs n_components or sketch_size"):
        StreamingPCA(mode="sketch").partial_fit(torch.randn(3, 4))
    with pytest.raises(ValueError, match="transform: X has N = 3"):
        pca.transform(torch.randn(2, 3))


def test_memory_lean_helpers_equal_the_plain_computations():
    from landscape_kernels.kernels.checks import all_finite
    from landscape_kernels.trajectory.pca import _mean64, _row_sq_norms64

    x = torch.full((3, 5), 3e38)  # finite, but its float32 sum overflows: the tiled exact test decides
    assert all_finite(x)
    x[2, 4] = float("nan")
    assert not all_finite(x)
    X = torch.randn(7, 300_001, generator=torch.Generator().manual_seed(0)) + 1e3
    assert torch.allclose(_mean64(X), X.double().mean(0), rtol=1e-15, atol=0)
    assert torch.allclose(_row_sq_norms64(X), X.double().square().sum(1), rtol=1e-13, atol=0)
