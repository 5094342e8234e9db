"""loss_profiles against a plain loop over points; flatness exact on analytic loss profiles."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape_kernels.linalg.profiles import LossEvaluator, flatness, loss_profiles


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def plain_loop(model, x, y, names, directions, deltas):
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    out = torch.zeros(directions.shape[0], len(deltas), dtype=torch.float64)
    for k, d in enumerate(directions):
        for g, delta in enumerate(deltas):
            values = {n: params[n].detach() + delta * part.reshape(params[n].shape)
                      for n, part in zip(names, d.split(sizes))}
            out[k, g] = F.cross_entropy(functional_call(model, values, (x,)), y)
    return out


@pytest.mark.parametrize("params,fast", [(["2.weight"], None), (["2.weight"], False), (None, None),
                                         (["0.weight", "4.bias"], None)])
def test_profiles_equal_a_plain_loop(params, fast, gen):
    model = mlp()
    x, y = torch.randn(23, 7, dtype=torch.float64, generator=gen), torch.randint(0, 3, (23,), generator=gen)
    names = params or [n for n, _ in model.named_parameters()]
    P = sum(dict(model.named_parameters())[n].numel() for n in names)
    directions = torch.randn(4, P, dtype=torch.float64, generator=gen)
    deltas = torch.linspace(-2, 2, 5, dtype=torch.float64)
    model.train()
    got = loss_profiles(model, F.cross_entropy, (x, y), directions, deltas, params=params, batch_size=10,
                        points_per_pass=3, fast_path=fast)
    assert model.training  # restored
    model.eval()
    assert torch.allclose(got, plain_loop(model, x, y, names, directions, deltas), rtol=1e-12, atol=0)


def test_points_per_pass_follow_the_memory_budget(gen):
    model = mlp()
    x, y = torch.randn(23, 7, dtype=torch.float64, generator=gen), torch.randint(0, 3, (23,), generator=gen)
    directions = torch.randn(3, 30, dtype=torch.float64, generator=gen)

    def evaluator(fast_path=False, **kw):
        return LossEvaluator(model, F.cross_entropy, (x, y), directions, params=["2.weight"], batch_size=10,
                             fast_path=fast_path, **kw)

    # Leaf outputs per sample: 6 + 6 + 5 + 5 + 3 = 25 numbers; a point holds 10 rows of them plus 30 weights.
    per_point = (10 * 25 + 30) * 8
    assert evaluator(memory_budget=7 * per_point + 1).points_per_pass == 7
    assert evaluator(memory_budget=1).points_per_pass == 1
    assert evaluator(memory_budget=2**40).points_per_pass == LossEvaluator.MAX_POINTS_PER_PASS
    k, d = torch.arange(3).repeat(4), torch.linspace(-1, 1, 12, dtype=torch.float64)
    assert torch.allclose(evaluator(memory_budget=1).losses(k, d), evaluator().losses(k, d), rtol=1e-13, atol=0)
    # the fast path bounds its temporaries by row tiles: its default does not depend on the budget
    assert evaluator(fast_path=None, memory_budget=1).points_per_pass == LossEvaluator.FAST_POINTS_PER_PASS
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        evaluator(memory_budget=0)
    with pytest.raises(ValueError, match="points_per_pass must be a positive int or None"):
        evaluator(points_per_pass=0)


def test_directions_as_a_dict_and_bad_input(gen):
    model = mlp()
    x, y = torch.randn(5, 7, dtype=torch.float64, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    d = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen)
    as_dict = loss_profiles(model, F.cross_entropy, (x, y), {"2.weight": d}, [0.5], params=["2.weight"])
    flat = loss_profiles(model, F.cross_entropy, (x, y), d.reshape(2, -1), [0.5], params=["2.weight"])
    assert torch.equal(as_dict, flat)
    with pytest.raises(ValueError, match=r"directions must have shape \(K, P\) = \(K, 30\)"):
        loss_profiles(model, F.cross_entropy, (x, y), torch.randn(2, 29, dtype=torch.float64), [0.5], params=["2.weight"])
    with pytest.raises(ValueError, match="fast_path=True needs"):
        loss_profiles(model, F.cross_entropy, (x, y), torch.randn(2, 3, dtype=torch.float64), [0.5], params=["4.bias"],
                      fast_path=True)
    with pytest.raises(ValueError, match=r"params: \['9.weight'\] are not parameters"):
        loss_profiles(model, F.cross_entropy, (x, y), torch.randn(2, 3, dtype=torch.float64), [0.5], params=["9.weight"])
    with pytest.raises(ValueError, match="no samples"):
        loss_profiles(model, F.cross_entropy, (x[:0], y[:0]), flat, [0.5], params=["2.weight"])


class Analytic(nn.Module):
    """A 'model' whose loss is L0 * exp(q(theta)) with q chosen per direction (the inputs are ignored)."""

    def __init__(self, K):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(K, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], -1)


def analytic_loss(right_curv, left_curv, loss0=0.3):
    def loss(out, y):
        t = out[0]
        q = torch.where(t > 0, right_curv * t**2, left_curv * t**2).sum()
        return loss0 * torch.exp(q)

    return loss


def test_flatness_exact_on_analytic_profiles():
    # ln L - ln L0 = a t^2 on the right, b t^2 on the left: crossings at 1/sqrt(a), -1/sqrt(b);
    # b = 0 never crosses (saturated at the cap); a = 1e-5 crosses beyond the first bracket step.
    a = torch.tensor([4.0, 1.0, 1e-5, 0.25], dtype=torch.float64)
    b = torch.tensor([4.0, 0.01, 1.0, 0.0], dtype=torch.float64)
    model = Analytic(4)
    data = (torch.zeros(3, 1), torch.zeros(3))
    res = flatness(model, analytic_loss(a, b), data, torch.eye(4, dtype=torch.float64))
    right = 1 / a.sqrt()
    left = -1 / b.sqrt()
    assert torch.allclose(res.right, right, atol=0.01)
    assert torch.allclose(res.left[:3], left[:3], atol=0.01)
    assert res.saturated_left.tolist() == [False, False, False, True] and not res.saturated_right.any()
    assert res.left[3] == -1000.0
    assert torch.allclose(res.widths, res.right - res.left)
    assert res.loss0 == pytest.approx(0.3)
    # another threshold: ln L - ln L0 = 2 at sqrt(2 / a)
    res2 = flatness(model, analytic_loss(a, b), data, torch.eye(4, dtype=torch.float64), threshold=2.0, tol=1e-4)
    assert torch.allclose(res2.right, (2 / a).sqrt(), atol=1e-4)
    assert set(res.to_dict()) >= {"widths", "left", "right", "saturated_left", "saturated_right"}


def test_flatness_bad_input():
    model = Analytic(2)
    with pytest.raises(ValueError, match="step must be a finite number > 0"):
        flatness(model, analytic_loss(torch.ones(2), torch.ones(2)), (torch.zeros(3, 1), torch.zeros(3)),
                 torch.eye(2, dtype=torch.float64), step=0)
    with pytest.raises(ValueError, match="ln L needs a positive loss"):
        flatness(model, analytic_loss(torch.ones(2), torch.ones(2), loss0=0.0), (torch.zeros(3, 1), torch.zeros(3)),
                 torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("tile_elements", [1, 40, 2**21])
def test_fast_path_row_tiles_give_the_same_losses(tile_elements, gen, monkeypatch):
    """Tiles of 64 rows (the minimum), of a few rows' worth of elements, and one tile per batch."""
    model = mlp()
    x, y = torch.randn(150, 7, dtype=torch.float64, generator=gen), torch.randint(0, 3, (150,), generator=gen)
    directions = torch.randn(3, 30, dtype=torch.float64, generator=gen)
    k, d = torch.arange(3).repeat_interleave(5), torch.linspace(-2, 2, 15, dtype=torch.float64)
    want = LossEvaluator(model, F.cross_entropy, (x, y), directions, params=["2.weight"], fast_path=False).losses(k, d)
    monkeypatch.setattr(LossEvaluator, "TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(LossEvaluator, "MIN_TILE_ROWS", 1 if tile_elements == 40 else 64)
    got = LossEvaluator(model, F.cross_entropy, (x, y), directions, params=["2.weight"], points_per_pass=4,
                        batch_size=100).losses(k, d)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss()], ids=["F", "module"])
def test_fused_relu_linear_cross_entropy_path(bias, dtype, loss_fn, gen):
    """W2 of Linear-ReLU-Linear-ReLU-Linear under cross-entropy: the compiled profile op serves it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 3, bias=bias)).to(dtype)
    x, y = torch.randn(37, 7, dtype=dtype, generator=gen), torch.randint(0, 3, (37,), generator=gen)
    directions = torch.randn(4, 30, dtype=dtype, generator=gen)
    deltas = torch.linspace(-3, 3, 7, dtype=torch.float64)
    ev = LossEvaluator(model, loss_fn, (x, y), directions, params=["2.weight"], batch_size=16)
    assert ev.fused and ev.points_per_pass == LossEvaluator.MAX_POINTS_PER_PASS
    got = loss_profiles(model, loss_fn, (x, y), directions, deltas, params=["2.weight"], batch_size=16,
                        points_per_pass=5)
    want = plain_loop(copy.deepcopy(model).double(), x.double(), y, ["2.weight"], directions.double(), deltas)
    assert torch.allclose(got, want, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.1)  # not served by the op: the tiled path takes it
    assert not LossEvaluator(model, smoothing, (x, y), directions, params=["2.weight"]).fused


@pytest.mark.parametrize("zd_cache_bytes", [0, 3 * 37 * 5 * 8, 2**30])  # groups of 1, of 3, all at once
def test_flatness_in_direction_groups_with_kept_outputs(zd_cache_bytes):
    gen = torch.Generator().manual_seed(0)  # data whose rays include crossings and capped sides
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 3)).double()
    x, y = torch.randn(37, 7, dtype=torch.float64, generator=gen), torch.randint(0, 3, (37,), generator=gen)
    directions = torch.nn.functional.normalize(torch.randn(7, 30, dtype=torch.float64, generator=gen), dim=1)
    kw = dict(params=["2.weight"], step=10.0, cap=110.0, tol=1e-3)  # crossings at about 40 to 130
    want = flatness(model, F.cross_entropy, (x, y), directions, fast_path=False, **kw)
    got = flatness(model, F.cross_entropy, (x, y), directions, zd_cache_bytes=zd_cache_bytes, **kw)
    for field in ("left", "right", "widths", "saturated_left", "saturated_right"):
        assert torch.allclose(getattr(got, field).double(), getattr(want, field).double(), atol=1e-9), field
    assert not got.saturated_right.all() and got.saturated_left.any()  # crossings found, and a capped side
