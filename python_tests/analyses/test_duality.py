"""The activity–weight duality and the gap decomposition on known answers: the duality exactly through
whole networks for every layer and a batch at once; the nearest-neighbour pairing against brute force;
the exact layer Hessian against torch.func; the decomposition of a linear model whose losses are
quadratic in closed form."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from landscape_kernels.analyses.duality import (
    direction_statistics, dual_weight_change, gap_decomposition, layer_inputs, nearest_same_class, top_shares)
from landscape_kernels.analyses.noise_curvature import layer_factors, layer_hessian
from landscape_kernels.training.models import duality_mlp


def _mlp(bias):
    torch.manual_seed(0)
    # activations that never silence a whole layer (a zero input has no dual; gap_decomposition skips it)
    return nn.Sequential(nn.Linear(9, 7, bias=bias), nn.LeakyReLU(0.1), nn.Linear(7, 6, bias=bias), nn.Tanh(),
                         nn.Linear(6, 5, bias=bias), nn.Softplus(), nn.Linear(5, 4, bias=bias)).double()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layer", ["0.weight", "2.weight", "4.weight", "6.weight"])
def test_the_dual_weight_change_gives_the_changed_inputs_outputs_through_the_whole_network(layer, bias):
    model = _mlp(bias)
    g = torch.Generator().manual_seed(1)
    x, x_new = torch.randn(13, 9, generator=g, dtype=torch.float64), torch.randn(13, 9, generator=g, dtype=torch.float64)
    a, a_new = layer_inputs(model, x, layer), layer_inputs(model, x_new, layer)
    W = dict(model.named_parameters())[layer].detach()
    dW = dual_weight_change(W, a, a_new - a)  # the whole batch at once
    params = {n: p.detach() for n, p in model.named_parameters()}
    moved = vmap(lambda w, xi: functional_call(model, {**params, layer: w}, (xi[None],))[0])(W + dW, x)
    torch.testing.assert_close(moved, model(x_new).detach(), rtol=0, atol=1e-12)
    # minimal norm: dW_k is rank one along a_k, the least-norm solution of dW a_k = W da_k
    for k in range(3):
        lstsq = torch.linalg.lstsq(a[k][None], (W @ (a_new[k] - a[k]))[None]).solution.T
        torch.testing.assert_close(dW[k], lstsq, rtol=1e-9, atol=1e-12)


def test_nearest_same_class_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    pool_x, pool_y = torch.randn(157, 3, 5, generator=g), torch.randint(0, 4, (157,), generator=g)
    q_x, q_y = torch.randn(61, 3, 5, generator=g), torch.randint(0, 4, (61,), generator=g)
    got = nearest_same_class(q_x, q_y, pool_x, pool_y, block=7)
    d = torch.cdist(q_x.reshape(61, -1).double(), pool_x.reshape(157, -1).double())
    d[q_y[:, None] != pool_y[None, :]] = float("inf")
    assert torch.equal(got, d.argmin(1))
    with pytest.raises(ValueError, match="class 9 has no sample in the pool"):
        nearest_same_class(q_x, torch.full((61,), 9), pool_x, pool_y)


def test_the_exact_layer_hessian_equals_torch_func():
    model = duality_mlp((10, 5, 4, 3), seed=3).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    H = layer_hessian(layer_factors(model, F.cross_entropy, x, y, "3.weight"))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(w):
        return F.cross_entropy(functional_call(model, {**params, "3.weight": w}, (x,)), y)

    want = torch.func.hessian(loss)(params["3.weight"]).reshape(20, 20)
    torch.testing.assert_close(H, want, rtol=1e-10, atol=1e-12)


class LinearModel(nn.Module):
    """f(x) = w . (A x): the analysed layer w (1 x h) after a fixed linear map A."""

    def __init__(self, d, h):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, 1, bias=False))

    def forward(self, x):
        return self.net(x)


def half_mse(out, y):
    return 0.5 * (out[:, 0] - y.double()).pow(2).mean()


def test_the_decomposition_of_a_linear_model_matches_its_closed_form():
    """l = (w.a - t)^2 / 2 with a = A x: the Hessian in w is E[a a^T]; l(test_k) - l(pair_k) =
    (r_test^2 - r_pair^2) / 2; the estimate equals its mean exactly; the real gap is the means' difference."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 1, bias=False)).double()
    g = torch.Generator().manual_seed(4)
    xtr, xte = torch.randn(80, 6, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    ytr, yte = torch.randint(0, 3, (80,), generator=g), torch.randint(0, 3, (30,), generator=g)  # classes = targets
    d = gap_decomposition(model, half_mse, "1.weight", (xtr, ytr), (xte, yte))
    A, w = model[0].weight.detach(), model[1].weight.detach()[0]
    a_tr, a_te = xtr @ A.T, xte @ A.T
    r_tr, r_te = a_tr @ w - ytr.double(), a_te @ w - yte.double()
    pair = nearest_same_class(xte, yte, xtr, ytr)
    torch.testing.assert_close(torch.tensor(d.eigenvalues), torch.linalg.eigvalsh(a_tr.T @ a_tr / 80).flip(0),
                               rtol=1e-10, atol=1e-12)
    closed = float((0.5 * (r_te ** 2 - r_tr[pair] ** 2)).mean())
    assert d.paired_gap == pytest.approx(closed, rel=1e-10)
    assert d.estimate == pytest.approx(closed, rel=1e-10) and d.identity_residual < 1e-12
    assert d.real_gap == pytest.approx(float(0.5 * (r_te ** 2).mean() - 0.5 * (r_tr ** 2).mean()), rel=1e-10)
    assert d.duality_error < 1e-12
    assert sum(d.terms) == pytest.approx(d.estimate, rel=1e-12)


def test_direction_statistics_and_top_shares():
    theta = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[2.0, 5.0], [4.0, 5.0]], dtype=torch.float64)
    mu_w, mu_g, s_w, s_g, c = direction_statistics(theta, g)
    assert mu_w.tolist() == [2.0, 0.0] and s_w.tolist() == [1.0, 0.0] and s_g.tolist() == [1.0, 0.0]
    assert c.tolist() == [1.0, 0.0]  # a direction without spread has c = 0, not NaN
    mean_product = (theta * g).mean(0)
    torch.testing.assert_close(mu_g * mu_w + c * s_g * s_w, mean_product)
    shares = top_shares(torch.tensor([3.0, 1.0, 0.5, 0.5]).numpy(), fractions=(0.25, 0.5, 1.0))
    assert shares == {0.25: 0.6, 0.5: 0.8, 1.0: 1.0}


def test_bad_inputs_are_named():
    W = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="input\\(s\\) a are zero"):
        dual_weight_change(W, torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="must both be \\(N, 4\\)"):
        dual_weight_change(W, torch.ones(2, 3), torch.ones(2, 3))
    model = duality_mlp((10, 5, 4, 3), seed=0)
    with pytest.raises(ValueError, match="weight of a Linear layer"):
        layer_inputs(model, torch.randn(2, 10), "1.weight")
    with pytest.raises(ValueError, match="at least one sample"):
        gap_decomposition(model, F.cross_entropy, "3.weight", (torch.randn(0, 10), torch.zeros(0, dtype=torch.long)),
                          (torch.randn(2, 10), torch.zeros(2, dtype=torch.long)))
