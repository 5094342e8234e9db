"""KFAC and EKFAC (operators.kfac): exact where the approximation is exact, equal to curvlinops' KFAC on
the same models when it is installed, EKFAC never further from the exact GGN than KFAC, and the
operator's eigenvalues, trace and inverse against the dense matrix it stands for (float64)."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

import landscape_kernels as lk
from landscape_kernels.operators import EKFACOperator, KFACOperator, kfac_parameters
from test_diagonal import TinySequenceModel, dense_ggn
from testing import seed_from, small_mlp, vmap_per_sample_gradients


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=op.dtype))


def block_mask(model, names=None):
    """(P, P) True on the diagonal blocks of each parameter."""
    sizes = [p.numel() for n, p in model.named_parameters() if names is None or n in names]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return owner[:, None] == owner[None, :]


def mlp_problem(gen, N=13):
    seed_from(gen)
    model = small_mlp((5, 6, 3), nn.Tanh)
    return model, torch.randn(N, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def cnn_problem(gen):
    seed_from(gen)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()
    return model, torch.randn(8, 2, 5, 5, dtype=torch.float64, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def test_exact_for_one_linear_layer(gen):
    """One linear layer, weight and bias in one block: KFAC is the GGN under the squared error (any N),
    and the GGN and the empirical Fisher under cross-entropy for one sample."""
    seed_from(gen)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(11, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(11, 3, dtype=torch.float64, generator=gen)
    for approx in ("expand", "reduce"):
        K = dense(KFACOperator(layer, (x, y), loss="mse", kfac_approx=approx, separate_weight_and_bias=False,
                               batch_size=4))
        assert torch.allclose(K, dense_ggn(layer, x, "mse"), rtol=0, atol=1e-13)
    labels = torch.randint(0, 3, (1,), generator=gen)
    K = dense(KFACOperator(layer, (x[:1], labels), separate_weight_and_bias=False))
    assert torch.allclose(K, dense_ggn(layer, x[:1], "cross_entropy"), rtol=0, atol=1e-13)
    K = dense(KFACOperator(layer, (x[:1], labels), fisher_type="empirical", separate_weight_and_bias=False))
    g = vmap_per_sample_gradients(layer, x[:1], labels)
    assert torch.allclose(K, g.T @ g, rtol=0, atol=1e-13)


@pytest.mark.parametrize("separate", [True, False])
def test_ekfac_is_never_further_from_the_ggn_than_kfac(separate, gen):
    for model, x, y in (mlp_problem(gen), cnn_problem(gen)):
        G = dense_ggn(model, x, "cross_entropy")
        K = dense(KFACOperator(model, (x, y), batch_size=5, separate_weight_and_bias=separate))
        E = dense(EKFACOperator(model, (x, y), batch_size=5, separate_weight_and_bias=separate))
        assert torch.allclose(K, K.T, atol=1e-15) and torch.allclose(E, E.T, atol=1e-14)
        assert (E - G).norm() <= (K - G).norm()
        if separate:  # within each parameter's block EKFAC is the Frobenius-closest in KFAC's eigenbasis
            Gb = G * block_mask(model)
            assert (E - Gb).norm() < (K - Gb).norm()


def test_eigenvalues_trace_inverse_and_solvers(gen):
    model, x, y = mlp_problem(gen)
    for cls in (KFACOperator, EKFACOperator):
        op = cls(model, (x, y), damping=0.05, batch_size=6)
        A = dense(op)
        ref = torch.linalg.eigvalsh(A).flip(0)
        assert torch.allclose(op.eigenvalues(), ref, rtol=0, atol=1e-13)
        assert op.trace() == pytest.approx(float(A.trace()), rel=1e-12)
        V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
        assert torch.allclose(A @ op.inverse_matmat(V), V, atol=1e-10)
        assert torch.allclose(op.inverse_matmat(V, damping=1.0), torch.linalg.solve(A + 0.95 * torch.eye(A.shape[0],
                              dtype=A.dtype), V), atol=1e-10)
        top = lk.lanczos_eigs(op, k=3, seed=0).eigenvalues
        assert np.allclose(np.asarray(top, dtype=float), ref[:3].numpy(), rtol=1e-8)
        scipy_top = np.sort(sla.eigsh(op.to_scipy(), k=3, which="LA", tol=1e-12)[0])[::-1]
        assert np.allclose(scipy_top, ref[:3].numpy(), rtol=1e-9)
        trace, se = lk.hutchinson_trace(op, num_probes=400, seed=1)
        assert abs(trace - op.trace()) < 5 * se
        density = lk.spectral_density(op, num_probes=4, num_steps=op.shape[0], seed=0)
        assert float(density.nodes.max()) == pytest.approx(float(ref[0]), rel=1e-8)  # a full chain finds the top
        d = op.as_parameter_dict(A.diagonal())
        assert list(d) == op.param_names and d["0.weight"].shape == model[0].weight.shape


def test_ekfac_from_an_existing_kfac(gen):
    model, x, y = mlp_problem(gen)
    for separate in (True, False):
        kfac = KFACOperator(model, (x, y), batch_size=5, damping=0.01, separate_weight_and_bias=separate)
        before = dense(kfac)
        from_kfac = EKFACOperator.from_kfac(kfac)
        direct = EKFACOperator(model, (x, y), batch_size=5, damping=0.01, separate_weight_and_bias=separate)
        assert isinstance(from_kfac, EKFACOperator)
        assert torch.allclose(dense(from_kfac), dense(direct), rtol=0, atol=1e-14)
        assert torch.equal(dense(kfac), before)  # the KFAC operator is unchanged
    with pytest.raises(TypeError, match="kfac must be a KFACOperator"):
        EKFACOperator.from_kfac(direct)


def test_monte_carlo_fisher_approaches_type_2(gen):
    model, x, y = mlp_problem(gen)
    K2 = dense(KFACOperator(model, (x, y)))
    mc = dense(KFACOperator(model, (x, y), fisher_type="mc", mc_samples=4000, seed=3))
    assert (mc - K2).norm() < 0.05 * K2.norm()
    again = dense(KFACOperator(model, (x, y), fisher_type="mc", mc_samples=4000, seed=3))
    assert torch.equal(mc, again)  # seeded draws


def test_transformers_conv1d_is_a_transposed_linear(gen):
    transformers = pytest.importorskip("transformers")
    seed_from(gen)
    conv = transformers.pytorch_utils.Conv1D(3, 5).double()  # (nf=out, nx=in): weight (in, out)
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
    linear = nn.Linear(5, 3).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (4, 6), generator=gen)
    perm = torch.arange(15).reshape(5, 3).T.reshape(-1)  # Linear's (out, in) order within Conv1D's (in, out)
    for separate in (True, False):
        for cls in (KFACOperator, EKFACOperator):
            A = dense(cls(conv, (x, y), separate_weight_and_bias=separate))
            L = dense(cls(linear, (x, y), separate_weight_and_bias=separate))
            order = torch.cat([perm, torch.arange(15, 18)])
            assert torch.allclose(A[order][:, order], L, rtol=0, atol=1e-13)


def test_sequence_model_covered_layers(gen):
    seed_from(gen)
    model = TinySequenceModel().double()
    tokens = torch.randint(0, 7, (5, 4), generator=gen)
    names = kfac_parameters(model)
    assert names == ["mix.weight", "mix.bias", "out.weight", "out.bias"]
    with pytest.raises(ValueError, match=r"embed.weight \(Embedding\).*norm.weight \(LayerNorm\).*kfac_parameters"):
        KFACOperator(model, (tokens, tokens))
    for approx in ("expand", "reduce"):
        K = dense(KFACOperator(model, (tokens, tokens), params=names, kfac_approx=approx))
        E = dense(EKFACOperator(model, (tokens, tokens), params=names, kfac_approx=approx))
        assert torch.isfinite(K).all() and (E.diagonal() >= -1e-15).all()


def test_gpt2_conv1d_blocks():
    """KFAC and EKFAC on a tiny GPT-2's last MLP (transformers' Conv1D): EKFAC is the closer to the dense GGN
    of those weights, and both keep the operator's contracts."""
    from real_models import build

    case = build("gpt2")
    names = [n for n in kfac_parameters(case.model) if n.startswith("transformer.h.1.mlp.")]
    assert names == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                     "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    G = dense_ggn(case.model, case.inputs, "cross_entropy", names)
    data = (case.inputs, case.targets)
    K = KFACOperator(case.model, data, params=names)
    E = EKFACOperator(case.model, data, params=names)
    KD, ED = dense(K), dense(E)
    Gb = G * block_mask(case.model, names)
    assert (ED - Gb).norm() < (KD - Gb).norm() < Gb.norm()
    assert torch.allclose(E.eigenvalues(), torch.linalg.eigvalsh(ED).flip(0), rtol=0, atol=1e-12)


def test_bad_arguments_are_named(gen):
    model, x, y = mlp_problem(gen)
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        KFACOperator(model, (x, y), fisher_type="exact")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFACOperator(model, (x, y), kfac_approx="sum")
    with pytest.raises(ValueError, match="mc_samples must be"):
        KFACOperator(model, (x, y), mc_samples=3)
    with pytest.raises(ValueError, match="damping must be"):
        KFACOperator(model, (x, y), damping=-1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        KFACOperator(model, (x, y), loss="nll")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double()
    with pytest.raises(ValueError, match="groups=2"):
        KFACOperator(grouped, (torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 1])))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"factors of the layers \['0', '2'\] are not finite"):
        KFACOperator(model, (bad, y))
    dead = small_mlp((5, 6, 3), nn.ReLU)
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every hidden unit dead: singular factors
    op = KFACOperator(dead, (x, y))
    with pytest.raises(ValueError, match="singular.*damping > 0"):
        op.inverse_matmat(torch.ones(op.shape[0], 1, dtype=torch.float64))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_device_and_dtype_agree_with_float64_on_the_cpu(device, dtype, gen):
    model, x, y = cnn_problem(gen)
    ref = {cls: dense(cls(model, (x, y), batch_size=3)) for cls in (KFACOperator, EKFACOperator)}
    moved = nn.Sequential(*[m for m in model]).to(device, dtype)
    xs = x.to(device, dtype).transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous input
    assert not xs.is_contiguous()
    for cls, R in ref.items():
        op = cls(moved, (xs, y.to(device)), batch_size=3)
        got = op.matmat(torch.eye(op.shape[0], dtype=dtype, device=device)).double().cpu()
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert (got - R).abs().max() <= tol * R.abs().max(), cls.__name__


# ------------------------------------------------------------------------- against curvlinops
def curvlinops_dense(model, loss_module, batches, **kwargs):
    curvlinops = pytest.importorskip("curvlinops")
    params = list(model.parameters())
    op = curvlinops.KFACLinearOperator(model, loss_module, params, batches, check_deterministic=False, **kwargs)
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    out = op @ eye
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("separate", [True, False])
def test_equals_curvlinops_on_an_mlp(fisher_type, separate, gen):
    model, x, y = mlp_problem(gen, N=12)
    ref = curvlinops_dense(model, nn.CrossEntropyLoss(), [(x[:6], y[:6]), (x[6:], y[6:])], fisher_type=fisher_type,
                           separate_weight_and_bias=separate)
    mine = dense(KFACOperator(model, (x, y), fisher_type=fisher_type, batch_size=6, separate_weight_and_bias=separate))
    assert torch.allclose(mine, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_equals_curvlinops_on_a_cnn_and_a_sequence_model(approx, gen):
    model, x, y = cnn_problem(gen)
    ref = curvlinops_dense(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])], fisher_type="type-2",
                           kfac_approx=approx)
    mine = dense(KFACOperator(model, (x, y), batch_size=4, kfac_approx=approx))
    assert torch.allclose(mine, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    seq = small_mlp((4, 5, 3), nn.Tanh)
    xs = torch.randn(6, 7, 4, dtype=torch.float64, generator=gen)
    ys = torch.randn(6, 7, 3, dtype=torch.float64, generator=gen)
    ref = curvlinops_dense(seq, nn.MSELoss(), [(xs[:3], ys[:3]), (xs[3:], ys[3:])], fisher_type="type-2",
                           kfac_approx=approx, num_per_example_loss_terms=7)
    mine = dense(KFACOperator(seq, (xs, ys), loss="mse", batch_size=3, kfac_approx=approx))
    assert torch.allclose(mine, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
