"""Valley-change detection along training: the straight-path barrier on a function with a known
barrier, the trajectory barrier, the watch callback against direct evaluation, and the freezing rule."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_kernels.analyses.freezing import ValleyWatch, freezing, path_barrier, trajectory_barrier
from landscape_kernels.training.models import mlp
from landscape_kernels.training.trainer import SGDTrainer


def double_well():
    """A one-weight model whose loss is (w^2 - 1)^2 + 1/2: minima at w = +-1, a barrier of height 1 at 0."""
    model = nn.Linear(1, 1, bias=False).double()
    data = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))

    def loss_fn(out, y):
        return ((out.squeeze(-1) ** 2 - 1) ** 2 + 0.5 + 0 * y).mean()

    return model, loss_fn, data


def test_straight_path_barrier_of_a_known_double_well():
    model, loss_fn, data = double_well()
    with torch.no_grad():
        model.weight.fill_(-1.0)
    b = path_barrier(model, loss_fn, data, torch.tensor([2.0], dtype=torch.float64), points=9)  # -1 -> +1
    assert b.height == pytest.approx(1.0, abs=1e-12) and b.relative == pytest.approx(2.0, abs=1e-12)
    assert b.losses[0] == pytest.approx(0.5) and b.losses[4] == pytest.approx(1.5)
    assert float(model.weight.detach()) == -1.0  # the model is left as it was
    with torch.no_grad():
        model.weight.fill_(1.0)
    b = path_barrier(model, loss_fn, data, torch.tensor([0.5], dtype=torch.float64), points=9)  # 1 -> 1.5: convex
    assert b.height == 0.0 and b.relative == 0.0
    with pytest.raises(ValueError, match="points"):
        path_barrier(model, loss_fn, data, torch.tensor([1.0], dtype=torch.float64), points=2)


def test_trajectory_barrier_is_the_rise_above_the_line_between_the_ends():
    assert trajectory_barrier([1.0, 0.75, 0.5]) == 0.0
    assert trajectory_barrier([1.0, 1.2, 0.8, 0.2]) == pytest.approx(1.2 - (1.0 - 0.8 / 3))
    assert trajectory_barrier([0.5, 0.4]) == 0.0


def test_watch_records_what_direct_evaluation_gives():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    model = mlp((5, 8, 3), seed=1)
    watch = ValleyWatch(model, F.cross_entropy, (x, y), every=6, loss_every=2, points=5)
    seen = {}

    def keep(step):  # after the watch, before the step: the weights it measured
        if step % 6 == 0:
            seen[step] = [p.detach().clone() for p in model.parameters()]

    trainer = SGDTrainer(model, x, y, batch_size=10, lr=0.5, seed=0, callbacks=[watch, keep])
    trainer.run(max_epochs=3, stopping_rule=None)
    assert [h["step"] for h in watch.history] == [6, 12]
    probe = mlp((5, 8, 3), seed=1)
    for h in watch.history:
        a, b = seen[h["from_step"]], seen[h["step"]]
        losses = []
        for t in torch.linspace(0, 1, 5):
            with torch.no_grad():
                for p, pa, pb in zip(probe.parameters(), a, b):
                    p.copy_((1 - t) * pb + t * pa)  # the watch walks back from the current weights
                losses.append(float(F.cross_entropy(probe(x), y)))
        line = [losses[0] + k / 4 * (losses[-1] - losses[0]) for k in range(5)]
        want = max(max(v - w for v, w in zip(losses[1:-1], line[1:-1])), 0.0)
        assert h["straight"] == pytest.approx(want, abs=1e-6)
        inside = [v for s, v in watch.losses if h["from_step"] <= s <= h["step"]]
        assert len(inside) == 4 and h["trajectory"] == pytest.approx(trajectory_barrier(inside))
    state = watch.state_dict()
    other = ValleyWatch(model, F.cross_entropy, (x, y), every=6, loss_every=2)
    other.load_state_dict(state)
    assert other.history == watch.history and torch.equal(other.previous, watch.previous)
    with pytest.raises(ValueError, match="multiple"):
        ValleyWatch(model, F.cross_entropy, (x, y), every=5, loss_every=2)


def test_freezing_rule():
    times = [1, 2, 3, 4, 5, 6]
    barriers = [0.5, 0.0, 0.5, 0.5, 0.0, 0.0]
    sharp = [10, 8, 9, 6, 7, 7, 7]  # falls over intervals 1, 2 (8 -> 9 rises), 3, ...
    fz = freezing(times, barriers, sharp, threshold=0.1, drop=0.1, start=0)
    assert fz.escape_times == [1.0, 3.0] and fz.count == 2 and fz.time == 3.0  # interval 4: barrier, no drop
    assert fz.early_share == 1.0
    none = freezing(times, [0.0] * 6, sharp, threshold=0.1, start=0)
    assert none.count == 0 and none.time == 0.0 and math.isnan(none.early_share)
    with pytest.raises(ValueError, match="one sharpness per snapshot"):
        freezing(times, barriers, sharp[:-1], threshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        freezing(times, barriers, sharp, threshold=0)
