"""Matrix-free operators against explicitly formed matrices of small models (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels import FisherOperator, GGNOperator, HessianOperator, NoiseCovarianceOperator, lanczos_eigs
from testing import dense_cross_entropy_ggn, dense_hessian, rel_err, seed_from, small_mlp, vmap_per_sample_gradients


def mlp():
    return small_mlp((6, 5, 3), nn.Tanh)


def cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


def problem(kind, gen, N=21):
    seed_from(gen)
    model = mlp() if kind == "mlp" else cnn()
    x = torch.randn(N, 6, dtype=torch.float64, generator=gen) if kind == "mlp" else \
        torch.randn(N, 1, 5, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, x, y



@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", HessianOperator.METHODS)
def test_hessian_methods_match_the_dense_hessian(kind, method, gen):
    model, x, y = problem(kind, gen)
    model.train()
    if method == "rop" and kind == "cnn":
        with pytest.raises(ValueError, match="method='rop' does not apply: layer 0 \\(Conv2d\\)"):
            HessianOperator(model, F.cross_entropy, (x, y), method=method)
        assert HessianOperator(model, F.cross_entropy, (x, y)).method == "double_backward"  # what auto picks
        return
    op = HessianOperator(model, F.cross_entropy, (x, y), method=method, batch_size=8)
    H = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
    assert rel_err(op.matmat(V), H @ V) <= (1e-8 if method == "finite_difference" else 1e-12)
    assert rel_err(op @ V[:, 0], H @ V[:, 0]) <= (1e-8 if method == "finite_difference" else 1e-12)
    assert model.training  # the mode is restored


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("batched", [True, False])
def test_double_backward_batched_and_looped_columns_agree(kind, batched, gen):
    model, x, y = problem(kind, gen)
    default = HessianOperator(model, F.cross_entropy, (x, y), method="double_backward")
    assert default.batched_backward == (kind == "mlp")  # convolutions loop over the columns by default
    op = HessianOperator(model, F.cross_entropy, (x, y), method="double_backward", batch_size=8, keep_graph=True,
                         batched_backward=batched)
    H = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    V = torch.randn(op.shape[0], 4, dtype=torch.float64, generator=gen)
    assert rel_err(op.matmat(V), H @ V) <= 1e-12
    with pytest.raises(ValueError, match="batched_backward must be"):
        HessianOperator(model, F.cross_entropy, (x, y), batched_backward="yes")


def test_restricted_parameters_give_the_dense_sub_block(gen):
    model, x, y = problem("mlp", gen)
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, F.cross_entropy, x, y, names)
    op = HessianOperator(model, F.cross_entropy, (x, y), params=["2.weight"], keep_graph=True)
    start = sum(p.numel() for n, p in model.named_parameters() if n in ("0.weight", "0.bias"))
    block = H[start : start + 15, start : start + 15]
    V = torch.randn(15, 2, dtype=torch.float64, generator=gen)
    assert op.shape == (15, 15)
    assert rel_err(op.matmat(V), block @ V) <= 1e-12
    assert rel_err(op.matmat(V), block @ V) <= 1e-12  # with the kept graph, a second product too


def test_ggn_matches_the_dense_gauss_newton(gen):
    model, x, y = problem("cnn", gen)
    op = GGNOperator(model, F.cross_entropy, (x, y), batch_size=5)
    G = dense_cross_entropy_ggn(model, x, y, op.param_names)
    V = torch.randn(op.shape[0], 4, dtype=torch.float64, generator=gen)
    assert rel_err(op.matmat(V), G @ V) <= 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_noise_covariance_and_fisher_match_per_sample_gradients(kind, gen):
    model, x, y = problem(kind, gen)
    op = NoiseCovarianceOperator(model, F.cross_entropy, (x, y), batch_size=8)
    G = vmap_per_sample_gradients(model, x, y, op.param_names)
    C = (G - G.mean(0)).T @ (G - G.mean(0)) / G.shape[0]
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
    assert rel_err(op.matmat(V), C @ V) <= 1e-12
    fisher = FisherOperator(model, F.cross_entropy, (x, y), batch_size=8)
    assert rel_err(fisher.matmat(V), (G.T @ G / G.shape[0]) @ V) <= 1e-12
    sgd = NoiseCovarianceOperator(model, F.cross_entropy, (x, y), sgd_batch_size=4, without_replacement=True)
    assert rel_err(sgd.matmat(V), C @ V / 4 * (21 - 4) / 20) <= 1e-12
    # the noise spectrum from Lanczos is the spectrum of the dense covariance
    top = lanczos_eigs(op, 3, seed=1)
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(C).flip(0)[:3], rtol=1e-8)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_noise_operators_without_kept_factors_hold_one_batch_and_agree(kind, gen):
    """keep_factors=False records one batch at a time in every product (memory of one batch) and gives
    the same products as the kept factors."""
    model, x, y = problem(kind, gen)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, dtype=torch.float64, generator=gen)
    forwards = []
    model[0].register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[0]))
    for cls in (NoiseCovarianceOperator, FisherOperator):
        kept = cls(model, F.cross_entropy, (x, y), batch_size=8, sgd_batch_size=3)
        lean = cls(model, F.cross_entropy, (x, y), batch_size=8, sgd_batch_size=3, keep_factors=False)
        torch.testing.assert_close(lean.mean_gradient(), kept.mean_gradient(), rtol=1e-13, atol=0)
        forwards.clear()
        assert rel_err(lean.matmat(V), kept.matmat(V)) <= 1e-13
        assert forwards == [8, 8, 5]  # the lean product recorded each batch again; the kept one none
        assert lean._recorded is None and len(kept._recorded) == 3
    with pytest.raises(ValueError, match="keep_factors must be True or False"):
        NoiseCovarianceOperator(model, F.cross_entropy, (x, y), keep_factors="no")


def test_noise_factors_are_recorded_one_batch_at_a_time_unless_kept(gen, monkeypatch):
    """keep_factors=False: when a batch's factors are recorded, the previous batch's are already freed."""
    import weakref

    model, x, y = problem("mlp", gen)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64, generator=gen)
    record, previous, alive = NoiseCovarianceOperator._record, [], []

    def watched(self, *args, **kwargs):
        if previous:
            alive.append(previous[-1]() is not None)
        ps = record(self, *args, **kwargs)
        previous.append(weakref.ref(ps))
        return ps

    monkeypatch.setattr(NoiseCovarianceOperator, "_record", watched)
    lean = NoiseCovarianceOperator(model, F.cross_entropy, (x, y), batch_size=8, keep_factors=False)
    previous.clear()
    lean.matmat(V)
    assert alive == [False] * 4  # two hand-overs in the construction pass, two in the product
    alive.clear()
    previous.clear()
    NoiseCovarianceOperator(model, F.cross_entropy, (x, y), batch_size=8)
    assert alive == [True, True]


def _product_handovers(model, x, y, V, method, keep):
    """For each batch after the first in one product: was the previous batch's graph (double backward:
    the model's activations) or product state (rop) still alive when this batch began?"""
    import weakref

    previous, alive = [], []

    def seen(obj):
        if previous:
            alive.append(previous[-1]() is not None)
        previous.append(weakref.ref(obj))

    handle = model[1].register_forward_hook(lambda module, args, out: seen(out))
    H = HessianOperator(model, F.cross_entropy, (x, y), batch_size=8, method=method, keep_graph=keep)
    if method == "rop":  # the R-operator engine runs its own GEMMs: watch the states it prepares
        prepare = H._rop_engine.prepare

        def watched(*args):
            state = prepare(*args)
            seen(state)
            return state

        H._rop_engine.prepare = watched
    previous.clear()
    alive.clear()
    try:
        H.matmat(V)
    finally:
        handle.remove()
    return alive


@pytest.mark.parametrize("method", ["double_backward", "rop"])
def test_products_hold_one_batch_at_a_time_unless_graphs_are_kept(method, gen):
    """batch_size bounds memory: when batch i + 1 goes in, batch i's graph or state is already freed;
    with keep_graph they all stay."""
    model, x, y = problem("mlp", gen)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64, generator=gen)
    for keep in (False, True):
        assert _product_handovers(model, x, y, V, method, keep) == [keep, keep]  # three batches: two hand-overs


@pytest.mark.parametrize("method", ["double_backward", "rop"])
def test_one_batch_keeps_its_graph_by_default_and_several_do_not(method, gen):
    model, x, y = problem("mlp", gen)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64, generator=gen)
    assert _product_handovers(model, x, y, V, method, None) == [False, False]  # three batches: none kept
    op = HessianOperator(model, F.cross_entropy, (x, y), method=method)
    name = "_rop_state" if method == "rop" else "_gradient_with_graph"  # what builds a batch's graph or state
    builds, build = [], getattr(op, name)
    setattr(op, name, lambda *args: builds.append(1) or build(*args))
    first = op.matmat(V)
    assert rel_err(op.matmat(V), first) == 0 and builds == [1]  # the second product reused the first's
    with pytest.raises(ValueError, match="keep_graph must be None, True or False"):
        HessianOperator(model, F.cross_entropy, (x, y), keep_graph="yes")


@pytest.mark.parametrize("method", ["double_backward", "rop"])
@pytest.mark.parametrize("change", ["optimiser step", "load_state_dict", "new storage"])
def test_a_kept_graph_is_rebuilt_after_the_parameters_change(method, change, gen):
    model, x, y = problem("mlp", gen)
    op = HessianOperator(model, F.cross_entropy, (x, y), method=method, keep_graph=True)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=gen)
    before = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    assert rel_err(op.matmat(V), before @ V) <= 1e-12
    if change == "optimiser step":
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    elif change == "load_state_dict":
        model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()})
    else:
        model[0].weight.data = model[0].weight.data * 1.5
    after = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    assert rel_err(after @ V, before @ V) > 1e-3  # the change matters
    assert rel_err(op.matmat(V), after @ V) <= 1e-12


def test_a_kept_graph_follows_new_batch_norm_statistics(gen):
    """Products run in eval mode, on the running statistics: a train-mode forward that updates them
    makes the kept graph stale, so it is rebuilt."""
    seed_from(gen)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(21, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (21,), generator=gen)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=gen)
    op.matmat(V)
    model.train()
    model(3 * x + 1)  # new running statistics
    model.eval()
    assert rel_err(op.matmat(V), dense_hessian(model, F.cross_entropy, x, y, op.param_names) @ V) <= 1e-12


def test_lanczos_on_the_hessian_and_the_scipy_bridge(gen):
    from scipy.sparse.linalg import eigsh

    model, x, y = problem("mlp", gen)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    H = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    got = lanczos_eigs(op, 3, seed=2)
    assert torch.allclose(got.eigenvalues, want, rtol=1e-8)
    vals = torch.from_numpy(eigsh(op.to_scipy(), k=3, which="LA", tol=1e-12)[0]).flip(0)
    assert torch.allclose(vals, want, rtol=1e-8)


def test_operator_bad_input(gen):
    model, x, y = problem("mlp", gen)
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(model, F.cross_entropy, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"\['fc.weight'\] are not parameters of the model"):
        HessianOperator(model, F.cross_entropy, (x, y), params=["fc.weight"])
    with pytest.raises(ValueError, match="method must be one of"):
        HessianOperator(model, F.cross_entropy, (x, y), method="exact")
    with pytest.raises(ValueError, match="inputs and targets differ in length"):
        HessianOperator(model, F.cross_entropy, (x, y[:3]))
    op = HessianOperator(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"V must have shape \(53, K\)"):
        op.matmat(torch.zeros(5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="sgd_batch_size must be an int in"):
        NoiseCovarianceOperator(model, F.cross_entropy, (x, y), sgd_batch_size=0)


def test_wide_products_are_split_into_column_chunks(gen):
    model, x, y = problem("mlp", gen)
    op = HessianOperator(model, F.cross_entropy, (x, y), method="double_backward")
    H = dense_hessian(model, F.cross_entropy, x, y, op.param_names)
    V = torch.randn(op.shape[0], 20, dtype=torch.float64, generator=gen)
    assert op.column_chunk == 8
    assert rel_err(op.matmat(V), H @ V) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_top_eigenvalues_of_an_mlp_on_the_sklearn_digits(dtype, gen):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data[:300] / 16.0, dtype=dtype)
    y = torch.tensor(digits.target[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).to(dtype)
    op = HessianOperator(model, F.cross_entropy, (x, y), batch_size=128)
    model64 = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    want = torch.linalg.eigvalsh(dense_hessian(model64, F.cross_entropy, x.double(), y, op.param_names)).flip(0)[:3]
    got = lanczos_eigs(op, 3, tol=1e-10 if dtype == torch.float64 else 1e-5, seed=3)
    assert float(((got.eigenvalues - want) / want).abs().max()) <= (1e-8 if dtype == torch.float64 else 1e-4)
