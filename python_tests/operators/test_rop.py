"""The R-operator Hessian products of nn.Sequential MLPs against explicitly formed Hessians."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.operators.rop import loss_kind, unsupported_reason
from landscape_kernels.operators.hessian import HessianOperator
from testing import dense_hessian, rel_err, seed_from

ARCHITECTURES = {
    "relu, biases": lambda: nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
    "tanh, no bias": lambda: nn.Sequential(nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)),
    "sigmoid + leaky, dropout": lambda: nn.Sequential(nn.Linear(7, 6), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(6, 4),
                                                      nn.LeakyReLU(0.1), nn.Linear(4, 3)),
    "flatten first, tanh last": lambda: nn.Sequential(nn.Flatten(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3),
                                                      nn.Tanh(), nn.Identity()),
}
LOSSES = {"F.cross_entropy": F.cross_entropy, "nn.CrossEntropyLoss": nn.CrossEntropyLoss(),
          "F.mse_loss": F.mse_loss, "nn.MSELoss": nn.MSELoss()}


def problem(arch, loss, gen, dtype=torch.float64, N=23):
    seed_from(gen)
    model = ARCHITECTURES[arch]().to(dtype)
    x = torch.randn(N, 7, dtype=dtype, generator=gen)
    if arch.startswith("flatten"):
        x = x.reshape(N, 7, 1)
    if loss_kind(LOSSES[loss]) == "ce":
        y = torch.randint(0, 3, (N,), generator=gen)
    else:
        y = torch.randn(N, 3, dtype=dtype, generator=gen)
    return model, x, y


def subsets(model):
    names = [n for n, _ in model.named_parameters()]
    return [None, names[-1:], names[:1], list(dict.fromkeys(names[1:2] + names[-1:]))]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("keep_graph", [False, True])
def test_rop_matches_the_dense_hessian(arch, loss, keep_graph, gen):
    model, x, y = problem(arch, loss, gen)
    for params in subsets(model):
        op = HessianOperator(model, LOSSES[loss], (x, y), params=params, method="rop", batch_size=8,
                             keep_graph=keep_graph)
        H = dense_hessian(model, LOSSES[loss], x, y, op.param_names)
        V = torch.randn(op.shape[0], 5, dtype=torch.float64, generator=gen)
        assert rel_err(op.matmat(V), H @ V) <= 1e-12, params
        assert rel_err(op @ V[:, 0], H @ V[:, 0]) <= 1e-12, params
        assert rel_err(op.matmat(V[:, :2]), H @ V[:, :2]) <= 1e-12, params  # again: kept states are reused
    assert model.training


@pytest.mark.parametrize("arch", ["relu, biases", "sigmoid + leaky, dropout"])
def test_rop_float32_and_wide_column_chunks(arch, gen):
    model, x, y = problem(arch, "F.cross_entropy", gen, dtype=torch.float32, N=40)
    op = HessianOperator(model, F.cross_entropy, (x, y), method="rop")
    V = torch.randn(op.shape[0], 70, dtype=torch.float32, generator=gen)  # three column chunks
    out = op.matmat(V)
    H = dense_hessian(model, F.cross_entropy, x.double(), y, op.param_names)
    assert rel_err(out.double(), H @ V.double()) <= 1e-5
    model.float()
    db = HessianOperator(model, F.cross_entropy, (x, y), method="double_backward")
    assert rel_err(out, db.matmat(V)) <= 1e-5


def test_auto_picks_rop_only_where_it_applies(gen):
    model, x, y = problem("relu, biases", "F.cross_entropy", gen)
    assert HessianOperator(model, F.cross_entropy, (x, y)).method == "rop"
    assert HessianOperator(model, lambda o, t: F.cross_entropy(o, t), (x, y)).method == "double_backward"
    assert HessianOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y)).method == "double_backward"
    with pytest.raises(ValueError, match="names a parameter more than once"):
        HessianOperator(model, F.cross_entropy, (x, y), params=["0.weight", "0.weight"])
    with pytest.raises(ValueError, match="method='rop' does not apply: the loss is neither"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), (x, y), method="rop")


@pytest.mark.parametrize("case,match", [
    ("gelu", "layer 1 \\(GELU\\) is not a Linear"),
    ("3d inputs", "inputs of shape \\(23, 7, 1\\) reach a Linear"),
    ("soft targets", "cross-entropy targets are not non-negative class indices"),
    ("mse shape", "mse targets of shape \\(23,\\) differ"),
    ("not sequential", "not an nn.Sequential"),
])
def test_unsupported_models_are_named(case, match, gen):
    model, x, y = problem("relu, biases", "F.cross_entropy", gen)
    loss = F.cross_entropy
    if case == "gelu":
        model[1] = nn.GELU()
    elif case == "3d inputs":
        x = x.reshape(23, 7, 1)
    elif case == "soft targets":
        y = torch.softmax(torch.randn(23, 3, dtype=torch.float64, generator=gen), 1)
    elif case == "mse shape":
        loss, y = F.mse_loss, torch.randn(23, dtype=torch.float64, generator=gen)
    else:
        model = nn.ModuleList(list(model))
    names = [n for n, _ in model.named_parameters()]
    assert unsupported_reason(model, loss, names, x, y) is not None
    if case != "not sequential":
        with pytest.raises(ValueError, match=match):
            HessianOperator(model, loss, (x, y), method="rop")
    else:
        assert match in unsupported_reason(model, loss, names, x, y)
