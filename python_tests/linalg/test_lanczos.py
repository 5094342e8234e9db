"""lanczos_reorth against its reference, and lanczos_eigs on symmetric matrices with known spectra."""
import pytest
import torch

from landscape_kernels import ops, reference
from landscape_kernels.linalg.lanczos import lanczos_eigs
from landscape_kernels.operators.base import DenseOperator, check_symmetric
from testing import DEVICE_BACKENDS, DEVICES, DTYPES, assert_close, randn


# ------------------------------------------------------------------------------- lanczos_reorth
def orthonormal_bases(C, m, P, dtype, device, gen):
    q = torch.linalg.qr(torch.randn(C, P, m, dtype=torch.float64, generator=gen))[0]
    return q.transpose(1, 2).contiguous().to(dtype).to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,m,P,b,j", [(1, 1, 1, 1, 0), (1, 5, 7, 1, 5), (3, 12, 3001, 2, 9), (2, 30, 1025, 3, 17),
                                       (4, 8, 64, 1, 8)], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_reorth_matches_reference(C, m, P, b, j, contiguous, dtype, device, backend, gen):
    Q = orthonormal_bases(C, m, P, dtype, device, gen) if P >= m else torch.zeros(C, m, P, dtype=dtype, device=device)
    W = randn(C, b, P, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    with ops.use_backend(backend):
        w, norms = ops.lanczos_reorth(Q, W, j)
    w_ref, n_ref = reference.lanczos_reorth(Q.double().cpu(), W.double().cpu(), j)
    assert w.shape == W.shape and norms.shape == (C, b) and w.dtype == dtype
    assert_close(w, w_ref, dtype, what="vectors")
    assert_close(norms, n_ref, dtype, what="norms")
    if j:  # orthogonal to the basis in use
        overlap = (Q[:, :j].double() @ w.double().transpose(1, 2)).abs().max()
        assert overlap <= (1e-12 if dtype == torch.float64 else 1e-5) * float(W.abs().max()) * P ** 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_reorth_opcheck(device, gen):
    Q = orthonormal_bases(2, 6, 40, torch.float64, device, gen)
    W = torch.randn(2, 2, 40, dtype=torch.float64, generator=gen).to(device)
    torch.library.opcheck(torch.ops.landscape_kernels.lanczos_reorth.default, (Q, W, 4))


@pytest.mark.parametrize("args,exc,match", [
    ((torch.zeros(2, 3), torch.zeros(1, 1, 3), 0), ValueError, "Q \\(bases\\) must have shape"),
    ((torch.zeros(1, 3, 5), torch.zeros(1, 1, 4), 0), ValueError, "agree in C and P"),
    ((torch.zeros(1, 3, 5), torch.zeros(1, 1, 5), 4), ValueError, "j \\(basis vectors in use\\)"),
    ((torch.zeros(1, 3, 5), torch.zeros(1, 1, 5).double(), 1), TypeError, "W must have Q's dtype"),
    ((torch.zeros(1, 3, 5), torch.zeros(1, 0, 5), 1), ValueError, "W must be non-empty"),
])
def test_reorth_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.lanczos_reorth(*args)


# -------------------------------------------------------------------------------- lanczos_eigs
def matrix_with_spectrum(eigenvalues, gen, dtype=torch.float64):
    P = eigenvalues.numel()
    V = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64, generator=gen))[0]
    return ((V * eigenvalues.double()) @ V.T).to(dtype), eigenvalues.double()


def expected(eigenvalues, k, which):
    lam = torch.sort(eigenvalues).values
    if which == "LA":
        return lam.flip(0)[:k]
    if which == "SA":
        return lam[:k]
    if which == "LM":
        return lam[torch.argsort(lam.abs(), descending=True)][:k]
    high = (k + 1) // 2
    return torch.cat([lam.flip(0)[:high], lam[: k - high]])


def geometric(P, gen):  # a few outliers decaying geometrically over a bulk, as Hessians look
    return torch.cat([10.0 * 0.7 ** torch.arange(12, dtype=torch.float64), 0.05 * torch.rand(P - 12, generator=gen, dtype=torch.float64)])


def indefinite(P, gen):
    head = torch.tensor([9.0, -7.0, 5.0, -4.0, 3.0, -2.5], dtype=torch.float64)
    return torch.cat([head, 0.2 * (torch.rand(P - 6, generator=gen, dtype=torch.float64) - 0.5)])


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigs_indefinite_every_which(which, gen):
    A, lam = matrix_with_spectrum(indefinite(300, gen), gen)
    k = 3 if which in ("LA", "SA") else 4  # the wanted pairs are outliers, not the bulk's edge
    r = lanczos_eigs(A, k, which=which, seed=1)
    want = expected(lam, k, which)
    assert r.converged
    assert torch.allclose(r.eigenvalues, want, rtol=1e-8, atol=1e-8 * 9), (r.eigenvalues, want)
    assert float(r.residuals.max()) <= 1e-7 * 9


@pytest.mark.parametrize("name", ["geometric", "clustered", "ill_conditioned"])
def test_eigs_top_k_known_spectra(name, gen):
    P = 400
    if name == "geometric":
        lam = geometric(P, gen)
    elif name == "clustered":
        lam = torch.cat([torch.tensor([5.0, 5.0 + 1e-3, 5.0 + 2e-3]), torch.rand(P - 3, generator=gen, dtype=torch.float64)])
    else:  # condition number 1e8
        lam = torch.logspace(-8, 0, P, dtype=torch.float64)
    A, lam = matrix_with_spectrum(lam, gen)
    r = lanczos_eigs(A, 3, which="LA", num_iter=150, seed=2)
    want = expected(lam, 3, "LA")
    assert r.converged
    assert float(((r.eigenvalues - want) / want).abs().max()) <= 1e-8
    # residuals are the true ones
    V = r.eigenvectors
    true = (A @ V - V * r.eigenvalues).norm(dim=0)
    assert torch.allclose(r.residuals, true, rtol=1e-6, atol=1e-14)


def test_eigs_degenerate_with_block(gen):
    lam = geometric(300, gen)
    lam[:3] = 20.0  # a triple top eigenvalue
    A, lam = matrix_with_spectrum(lam, gen)
    r = lanczos_eigs(A, 4, block_size=3, num_iter=40, seed=3)
    assert r.converged
    assert torch.allclose(r.eigenvalues, expected(lam, 4, "LA"), rtol=1e-8)
    assert float((r.eigenvectors.T @ r.eigenvectors - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-8


@pytest.mark.parametrize("block_size", [1, 3])
def test_a_basis_in_many_segments_gives_the_same_eigenpairs(block_size, gen, monkeypatch):
    """The basis of a large model is kept in segments of 4+ rows (no copy as it grows); small problems
    fit one segment, so force many here: a clustered top (slow convergence, many steps) and a breakdown."""
    from landscape_kernels.linalg import lanczos

    A, lam = matrix_with_spectrum(torch.linspace(0, 1, 300, dtype=torch.float64) ** 0.5, gen)  # no gap: many steps
    one = lanczos_eigs(A, 4, block_size=block_size, num_iter=300 // block_size, tol=1e-9, seed=3)
    monkeypatch.setattr(lanczos, "_SEGMENT_ELEMENTS", 1)
    many = lanczos_eigs(A, 4, block_size=block_size, num_iter=300 // block_size, tol=1e-9, seed=3)
    assert many.num_steps * block_size > 3 * 18  # the basis spanned more than three segments
    assert one.converged and many.converged and many.num_products == one.num_products
    torch.testing.assert_close(many.eigenvalues, one.eigenvalues, rtol=1e-11, atol=0)
    torch.testing.assert_close(many.eigenvalues, expected(lam, 4, "LA"), rtol=1e-9, atol=0)
    V = many.eigenvectors
    assert float((V.T @ V - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-9
    v0 = torch.zeros(300, dtype=torch.float64)
    v0[[5, 9, 20]] = 1.0  # breakdown at step 3 of a single-vector run, inside the first segment
    r = lanczos_eigs(torch.diag(torch.arange(300, 0, -1, dtype=torch.float64)), 5, v0=v0, num_iter=300, seed=7)
    assert r.converged and torch.allclose(r.eigenvalues, torch.arange(300.0, 295.0, -1, dtype=torch.float64), rtol=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("block_size", [1, 3])
def test_thick_restarts_bound_the_basis_and_find_the_same_eigenpairs(which, block_size, gen, monkeypatch):
    from landscape_kernels.linalg import lanczos

    lam = torch.linspace(0, 1, 300, dtype=torch.float64) ** 0.5  # no gap at the top: many restarts
    lam[:3] = torch.tensor([1.5, 1.5, 1.5], dtype=torch.float64)  # a triple eigenvalue among the wanted
    A, lam = matrix_with_spectrum(lam, gen)
    sizes = []

    bases = []

    class Recorded(lanczos._Basis):
        def __init__(self, *args):
            super().__init__(*args)
            bases.append(self)

        def _segment(self, row):
            sizes.append(row + 1)
            return super()._segment(row)

    monkeypatch.setattr(lanczos, "_Basis", Recorded)
    monkeypatch.setattr(lanczos, "_SEGMENT_ELEMENTS", 4800)  # 16-row segments, restarts in column slices
    full = lanczos_eigs(A, 4, which=which, block_size=block_size, num_iter=300, tol=1e-9, seed=4)
    sizes.clear()
    r = lanczos_eigs(A, 4, which=which, block_size=block_size, max_basis=24, num_iter=600, tol=1e-9, seed=4,
                     residuals="estimate")
    assert r.converged and max(sizes) <= 24  # no basis row beyond max_basis was ever touched
    assert sum(s.shape[0] for s in bases[-1].segments) == 24  # the last segment stops at the bound: no unused rows
    want = expected(lam, 4, which)
    torch.testing.assert_close(r.eigenvalues, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(full.eigenvalues, want, rtol=1e-9, atol=1e-9)
    V = r.eigenvectors
    true = (A @ V - V * r.eigenvalues).norm(dim=0)
    assert float(true.max()) <= 1e-8 and torch.allclose(r.residuals, true, rtol=1e-4, atol=1e-12)
    assert float((V.T @ V - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-9
    if which == "LA":
        assert r.num_products > full.num_products  # the price of the bound: more products
    with pytest.raises(ValueError, match="max_basis must be an int >= k \\+ 3 \\* block_size"):
        lanczos_eigs(A, 4, block_size=block_size, max_basis=4 + 3 * block_size - 1)


def test_eigs_float32(gen):
    A, lam = matrix_with_spectrum(geometric(300, gen), gen, dtype=torch.float32)
    r = lanczos_eigs(A, 5, tol=1e-6, seed=4)
    assert r.eigenvectors.dtype == torch.float32
    assert float(((r.eigenvalues - lam.sort(descending=True).values[:5]) / lam.max()).abs().max()) <= 1e-4


def test_warm_start_needs_fewer_products(gen):
    A, lam = matrix_with_spectrum(geometric(400, gen), gen)
    cold = lanczos_eigs(A, 5, seed=5)
    E = torch.randn(400, 400, dtype=torch.float64, generator=gen)
    A2 = A + 1e-4 * (E + E.T)  # the next step of training: a slightly different Hessian
    warm = lanczos_eigs(A2, 5, v0=cold.eigenvectors, seed=5)
    cold2 = lanczos_eigs(A2, 5, seed=6)
    assert warm.converged and torch.allclose(warm.eigenvalues, cold2.eigenvalues, rtol=1e-8)
    assert warm.num_products < cold2.num_products


def test_breakdown_restarts_in_the_orthogonal_complement(gen):
    lam = torch.arange(30, 0, -1, dtype=torch.float64)
    A = torch.diag(lam)
    v0 = torch.zeros(30, dtype=torch.float64)
    v0[[5, 9, 20]] = 1.0  # the Krylov space of v0 is 3-dimensional: Lanczos breaks down at step 3
    r = lanczos_eigs(A, 5, v0=v0, num_iter=30, seed=7)
    assert torch.allclose(r.eigenvalues, lam[:5], rtol=1e-10)


def test_exact_when_the_basis_fills_the_space(gen):
    A, lam = matrix_with_spectrum(torch.linspace(-1, 1, 12, dtype=torch.float64), gen)
    r = lanczos_eigs(A, 12, which="SA")
    assert r.converged and torch.allclose(r.eigenvalues, lam.sort().values, atol=1e-12)


@pytest.mark.parametrize("block_size,num_iter", [(1, 6), (2, 4), (1, 40)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
def test_estimated_residuals_equal_the_true_ones(block_size, num_iter, dtype, rtol, gen):
    """Stopped early (residuals far from zero) and run to the whole space (residuals zero)."""
    A, _ = matrix_with_spectrum(geometric(40, gen), gen)
    A = A.to(dtype)
    est = lanczos_eigs(A, 4, num_iter=num_iter, tol=0.0, block_size=block_size, residuals="estimate", seed=3)
    true = lanczos_eigs(A, 4, num_iter=num_iter, tol=0.0, block_size=block_size, seed=3)
    assert est.num_products == true.num_products - 4  # the true residuals cost one product per pair
    assert torch.equal(est.eigenvalues, true.eigenvalues)
    scale = float(torch.linalg.matrix_norm(A.double(), 2))
    assert torch.allclose(est.residuals, true.residuals, rtol=rtol, atol=rtol * scale)
    if num_iter * block_size < 40:
        assert float(true.residuals.max()) > 1e-2 * scale  # a real test: the pairs are not converged
    else:
        assert float(est.residuals.max()) == 0.0


@pytest.mark.parametrize("which,block_size,max_basis", [("LA", 1, None), ("LA", 3, None), ("LA", 1, 30),
                                                         ("SA", 1, None), ("BE", 1, None)])
def test_the_eigenvalue_criterion_meets_tol_in_fewer_products(which, block_size, max_basis, gen):
    """criterion="eigenvalue" stops when min(r, r^2 / gap) <= tol ||A||: the eigenvalues are then within
    tol ||A|| of the true ones (known spectra), in fewer products than the residual criterion needs."""
    lam = geometric(400, gen) if which == "LA" else indefinite(400, gen)
    A, lam = matrix_with_spectrum(lam, gen)
    k, tol = (5 if which == "LA" else 3), 1e-6
    norm = float(lam.abs().max())
    kw = dict(which=which, tol=tol, seed=4, block_size=block_size, max_basis=max_basis, num_iter=400)
    by_value = lanczos_eigs(A, k, criterion="eigenvalue", **kw)
    by_residual = lanczos_eigs(A, k, **kw)
    want = expected(lam, k, which)
    assert by_value.converged and by_residual.converged
    error = (by_value.eigenvalues - want).abs()
    assert float(error.max()) <= tol * norm
    assert bool((error <= by_value.eigenvalue_errors * (1 + 1e-6) + 1e-13 * norm).all())  # the estimates bound them
    assert float(by_value.eigenvalue_errors.max()) <= tol * norm
    assert float(by_value.residuals.max()) > tol * norm  # a real difference: the vectors are not to tol
    assert by_value.num_products < by_residual.num_products, (by_value.num_products, by_residual.num_products)


def test_eigenvalue_error_bounds_are_the_smaller_of_r_and_r_squared_over_the_gap():
    from landscape_kernels.linalg.lanczos import eigenvalue_error_bounds

    theta = torch.tensor([0.0, 1.0, 1.5, 4.0], dtype=torch.float64)
    res = torch.tensor([0.1, 0.2, 1e-3], dtype=torch.float64)
    got = eigenvalue_error_bounds(theta, torch.tensor([3, 2, 1]), res)
    want = torch.tensor([min(0.1, 0.01 / 2.5), min(0.2, 0.04 / 0.5), min(1e-3, 1e-6 / 0.5)], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-15)
    single = eigenvalue_error_bounds(theta[:1], torch.tensor([0]), res[:1])
    assert torch.equal(single, res[:1])  # no other Ritz value: no gap to use


def test_eigs_bad_input(gen):
    A, _ = matrix_with_spectrum(geometric(20, gen), gen)
    with pytest.raises(ValueError, match="k must be an int in \\[1, 20\\]"):
        lanczos_eigs(A, 21)
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos_eigs(A, 2, which="largest")
    with pytest.raises(ValueError, match="residuals must be one of"):
        lanczos_eigs(A, 2, residuals="exact")
    with pytest.raises(ValueError, match="criterion must be one of"):
        lanczos_eigs(A, 2, criterion="value")
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos_eigs(DenseOperator(torch.triu(A)), 2, check_symmetry=True)
    with pytest.raises(ValueError, match="op must be a symmetric matrix"):
        lanczos_eigs(torch.triu(A), 2)
    for bad in (-1e-3, float("nan"), float("inf"), "1e-8"):
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            lanczos_eigs(A, 2, tol=bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_iter must be None or an int >= 1"):
            lanczos_eigs(A, 2, num_iter=bad)
    check_symmetric(A)

    class NaNAfterTwo(DenseOperator):
        calls = 0

        def matmat(self, V):
            self.calls += 1
            return V * float("nan") if self.calls > 2 else super().matmat(V)

    with pytest.raises(FloatingPointError, match="NaN/Inf at Lanczos step 2"):
        lanczos_eigs(NaNAfterTwo(A), 2)
    with pytest.raises(TypeError, match="op must be a square tensor or an operator"):
        lanczos_eigs([[1.0]], 1)


def test_eigs_warns_when_it_stops_before_tol(gen):
    from landscape_kernels.linalg.lanczos import LanczosNotConverged

    A, _ = matrix_with_spectrum(geometric(60, gen), gen)
    with pytest.warns(LanczosNotConverged, match="raise num_iter"):
        r = lanczos_eigs(A, 4, num_iter=6, tol=1e-12)
    assert not r.converged
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lanczos_eigs(A, 4, num_iter=6, tol=0.0)  # tol = 0: a fixed number of steps, no warning


def test_a_non_symmetric_operator_is_reported_and_never_converged():
    """The basis fills the 30-dimensional space, where the residual estimates vanish: converged must
    still rest on the true residuals, and the asymmetry is named."""
    A = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        r = lanczos_eigs(DenseOperator(A), 3)
    assert not r.converged and float(r.residuals.min()) > 1.0
    with pytest.warns(RuntimeWarning, match="not converged"):  # k = 1: no asymmetry measure, the residual says it
        assert not lanczos_eigs(DenseOperator(A), 1).converged
    S = (A + A.T) / 2  # the same space filled by a symmetric operator converges, exactly
    r = lanczos_eigs(DenseOperator(S), 3)
    assert r.converged and float(r.residuals.max()) < 1e-12
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(S).flip(0)[:3], rtol=1e-12)
