"""The curvature and noise operators on the models researchers bring (real_models.py): top eigenvalues
against scipy ``eigsh`` on products computed independently (plain double backward, or jvp/vjp and the
softmax Hessian for the GGN) and against the dense covariance of per-sample autograd gradients; inputs as
dicts and DataLoaders; finite differences right or refused."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import landscape_kernels as lk
from real_models import build, lm_loss
from testing import flat_parameter_function, loop_per_sample_gradients

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
K = 3


def top_eigsh(matvec, P):
    op = sla.LinearOperator((P, P), matvec=lambda v: matvec(torch.from_numpy(np.ascontiguousarray(v))).numpy(),
                            dtype=np.float64)
    return np.sort(sla.eigsh(op, k=K, which="LA", tol=1e-12)[0])[::-1]


def exact_hessian_top(case):
    f, theta = flat_parameter_function(case.model, None, case.inputs, lambda out: case.loss_fn(out, case.targets))

    def hvp(v):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.hvp(f, theta, v.reshape(-1))[1]

    return top_eigsh(hvp, theta.numel())


def exact_ggn_top(case):
    f, theta = flat_parameter_function(case.model, None, case.inputs, lambda out: out.reshape(-1, out.shape[-1]))
    with torch.no_grad():
        s = f(theta).softmax(-1)
    rows = s.shape[0]  # the mean cross-entropy divides by the rows of logits

    def ggn(v):
        with sdpa_kernel(SDPBackend.MATH):
            _, Jv = torch.func.jvp(f, (theta,), (v.reshape(-1),))
            HJv = (s * Jv - s * (s * Jv).sum(-1, keepdim=True)) / rows
            _, vjp = torch.func.vjp(f, theta)
            return vjp(HJv)[0]

    return top_eigsh(ggn, theta.numel())


def ours(op):
    return lk.lanczos_eigs(op, K, tol=1e-10, seed=0).eigenvalues.numpy()


def rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "encoder", "cnn"])
def test_hessian_top_eigenvalues_match_eigsh_on_independent_products(name):
    case = build(name)
    H = lk.HessianOperator(case.model, case.loss_fn, (case.inputs, case.targets))
    assert rel(ours(H), exact_hessian_top(case)) <= 1e-8


@pytest.mark.parametrize("name", ["gpt2", "bert", "cnn"])
def test_ggn_top_eigenvalues_match_eigsh_on_independent_products(name):
    case = build(name)
    G = lk.GGNOperator(case.model, case.loss_fn, (case.inputs, case.targets))
    assert rel(ours(G), exact_ggn_top(case)) <= 1e-8


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_float64_norms", "bert", "vit", "encoder", "cnn", "conv1d"])
def test_noise_covariance_and_fisher_match_the_dense_per_sample_covariance(name):
    case = build(name)
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets)
    N = G.shape[0]
    Gc = G - G.mean(0)
    centred = np.sort(torch.linalg.eigvalsh(Gc @ Gc.T / N).numpy())[::-1][:K]  # the nonzero spectrum, N x N
    uncentred = np.sort(torch.linalg.eigvalsh(G @ G.T / N).numpy())[::-1][:K]
    tol = 1e-6 if name == "llama" else 1e-8  # transformers' Llama norms round in float32 (capture/test_persample_real_models.py)
    C = lk.NoiseCovarianceOperator(case.model, case.loss_fn, (case.inputs, case.targets))
    F = lk.FisherOperator(case.model, case.loss_fn, (case.inputs, case.targets))
    assert rel(lk.lanczos_eigs(C, K - 1, tol=1e-10, seed=0).eigenvalues.numpy(), centred[: K - 1]) <= tol
    assert rel(ours(F), uncentred) <= tol


def test_dict_inputs_from_a_dataloader_give_the_operator_of_the_whole_batch():
    case = build("bert")
    rows = [({k: v[i] for k, v in case.inputs.items()}, case.targets[i]) for i in range(case.targets.shape[0])]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    V = torch.randn(sum(p.numel() for p in case.model.parameters()), 2, dtype=torch.float64)
    for Op in (lk.HessianOperator, lk.GGNOperator, lk.NoiseCovarianceOperator):
        whole = Op(case.model, case.loss_fn, (case.inputs, case.targets)).matmat(V)
        torch.testing.assert_close(Op(case.model, case.loss_fn, loader).matmat(V), whole, rtol=1e-10, atol=1e-12)
        cut = Op(case.model, case.loss_fn, (case.inputs, case.targets), batch_size=2).matmat(V)
        torch.testing.assert_close(cut, whole, rtol=1e-10, atol=1e-12)


def test_loss_profiles_take_dict_inputs():
    case = build("bert")
    P = sum(p.numel() for p in case.model.parameters())
    d = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-2
    got = lk.loss_profiles(case.model, case.loss_fn, (case.inputs, case.targets), d, [-1.0, 0.0, 2.0])
    f, theta = flat_parameter_function(case.model, None, case.inputs, lambda out: case.loss_fn(out, case.targets))
    with torch.no_grad():
        want = torch.tensor([[float(f(theta + t * d[k])) for t in (-1.0, 0.0, 2.0)] for k in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_output_fn_picks_the_tensor_of_the_loss():
    case = build("gpt2")
    V = torch.randn(sum(p.numel() for p in case.model.parameters()), 1, dtype=torch.float64)
    default = lk.HessianOperator(case.model, lm_loss, (case.inputs, case.targets)).matmat(V)
    explicit = lk.HessianOperator(case.model, lm_loss, (case.inputs, case.targets),
                                  output_fn=lambda out: out.logits).matmat(V)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_finite_differences_on_a_float32_gpt2_are_right():
    case = build("gpt2", dtype=torch.float32)
    fd = lk.HessianOperator(case.model, case.loss_fn, (case.inputs, case.targets), method="finite_difference")
    got = lk.lanczos_eigs(fd, K, tol=1e-6, seed=0).eigenvalues.double().numpy()
    assert rel(got, exact_hessian_top(case)) <= 1e-3  # exact: float64 double backward at the same weights


def test_finite_differences_that_cannot_be_accurate_refuse():
    case = build("gpt2", dtype=torch.float32)
    fd = lk.HessianOperator(case.model, case.loss_fn, (case.inputs, case.targets), method="finite_difference",
                            fd_dtype=torch.float32, fd_eps=1.0)  # a step far too large for the curvature
    V = torch.randn(fd.shape[0], 1)
    with pytest.raises(RuntimeError, match="finite differences cannot give column 0"):
        fd.matmat(V)
