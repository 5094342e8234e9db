"""SGD engine: known single steps, the Feng & Tu 2021 stopping rule, checkpoints and bit-for-bit resume."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.training.models import mlp
from landscape_kernels.trajectory.recorder import TrajectoryRecorder
from landscape_kernels.training.callbacks import WindowRecorder
from landscape_kernels.training.trainer import InstabilityGuard, SGDTrainer, StoppingRule, cosine_schedule


def blobs(n=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, generator=g) + 2.0 * F.one_hot(y, 5).float()
    return x, y


def test_full_batch_step_is_gradient_descent_on_least_squares():
    g = torch.Generator().manual_seed(1)
    X, t = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w0 = model.weight.detach().clone()
    trainer = SGDTrainer(model, X, t, batch_size=20, lr=0.05, loss_fn=F.mse_loss)
    trainer.run(max_epochs=1, stopping_rule=None)
    want = w0 - 0.05 * (2 / 20) * (X @ w0.T - t).T @ X
    assert torch.allclose(model.weight.detach(), want, rtol=1e-14, atol=0)
    assert trainer.history[0]["train_accuracy"] is None and trainer.stopped_by == "max_epochs"


def test_cosine_schedule_and_clipping_on_least_squares():
    """Full-batch steps: the lr follows the per-epoch cosine; a gradient above the clip is scaled to it."""
    sched = cosine_schedule(0.1, epochs=4, steps_per_epoch=3)
    assert sched(0) == sched(2) == pytest.approx(0.1)
    assert sched(6) == pytest.approx((0.1 + 0.001) / 2)
    assert sched(12) == sched(100) == pytest.approx(0.001)
    g = torch.Generator().manual_seed(1)
    X, t = torch.randn(20, 3, generator=g, dtype=torch.float64), 50 * torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w = model.weight.detach().clone()
    lrs = cosine_schedule(0.05, epochs=2, steps_per_epoch=1)
    trainer = SGDTrainer(model, X, t, batch_size=20, lr=0.05, loss_fn=F.mse_loss, lr_schedule=lrs, clip_grad_norm=1.0)
    trainer.run(max_epochs=2, stopping_rule=None)
    for step in range(2):
        grad = (2 / 20) * (X @ w.T - t).T @ X
        assert grad.norm() > 1.0
        w = w - lrs(step) * grad / grad.norm()
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-6, atol=0)
    assert trainer.state_dict()["settings"]["clip_grad_norm"] == 1.0
    with pytest.raises(ValueError, match="clip_grad_norm"):
        SGDTrainer(model, X, t, batch_size=4, clip_grad_norm=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        SGDTrainer(model, X, t, batch_size=4, lr_schedule=0.1)


def test_epochs_visit_every_sample_once_in_a_seeded_order():
    x = torch.arange(23.0)[:, None]
    seen = []

    class Spy:
        def before_step(self, trainer, step):
            b = trainer.batch_index * trainer.batch_size
            seen.append(x[_order(trainer)][b : b + trainer.batch_size].flatten().tolist())

    def _order(trainer):
        from landscape_kernels.training.trainer import _epoch_order
        return _epoch_order(23, trainer.seed, trainer.epoch, "cpu")

    trainer = SGDTrainer(nn.Linear(1, 1), x, torch.zeros(23, 1), batch_size=5, loss_fn=F.mse_loss, callbacks=[Spy()])
    trainer.run(max_epochs=2, stopping_rule=None)
    assert trainer.steps_per_epoch == 5 and trainer.step == 10  # the last batch of 3 is kept
    first, second = sum(seen[:5], []), sum(seen[5:], [])
    assert sorted(first) == sorted(second) == list(range(23)) and first != second


def test_stopping_rule_spec_1_1():
    rule = StoppingRule()
    good = [{"train_accuracy": 0.995, "full_loss": 4e-5}] * 9
    assert rule.satisfied(good)
    assert not rule.satisfied(good[:8])  # fewer than 9 epochs
    assert not rule.satisfied(good[:8] + [{"train_accuracy": 0.995, "full_loss": 6e-5}])
    assert not rule.satisfied([{"train_accuracy": 0.9, "full_loss": 1e-6}] + good[1:])  # mean 0.983
    x, y = blobs()
    trainer = SGDTrainer(mlp((5, 16, 3), seed=0), x, y, batch_size=10, lr=0.2)
    trainer.run(max_epochs=500, stopping_rule=StoppingRule(window=3, accuracy=0.99, loss=0.05))
    assert trainer.stopped_by == "stopping_rule" and trainer.history[-1]["full_loss"] < 0.05
    assert len(trainer.history) < 500


def run_interrupted(tmp_path, x, y, stop_at):
    """Train 3 epochs with a snapshot before every step, interrupted (KeyboardInterrupt) at step
    ``stop_at`` and resumed by a fresh trainer on a fresh model."""
    class Interrupt:
        def before_step(self, trainer, step):
            if step == stop_at:
                raise KeyboardInterrupt

    model = mlp((5, 16, 3), seed=0)
    rec = TrajectoryRecorder(model, params=["2.weight"], store=tmp_path / "traj", chunk_size=7)
    trainer = SGDTrainer(model, x, y, batch_size=10, momentum=0.5, checkpoint=tmp_path / "ckpt.pt",
                         callbacks=[rec, Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.run(max_epochs=3, stopping_rule=None)
    model = mlp((5, 16, 3), seed=99)  # different weights: all must come from the checkpoint
    rec = TrajectoryRecorder(model, params=["2.weight"], store=tmp_path / "traj", chunk_size=7)
    trainer = SGDTrainer(model, x, y, batch_size=10, momentum=0.5, checkpoint=tmp_path / "ckpt.pt", callbacks=[rec])
    trainer.resume().run(max_epochs=3, stopping_rule=None)
    return model, trainer, rec


@pytest.mark.parametrize("stop_at", [17, 26, 30])  # inside an epoch, at its first step, late in epoch 3
def test_resume_after_interruption_is_bit_for_bit(tmp_path, stop_at):
    x, y = blobs()
    model = mlp((5, 16, 3), seed=0)
    rec = TrajectoryRecorder(model, params=["2.weight"])
    straight = SGDTrainer(model, x, y, batch_size=10, momentum=0.5, callbacks=[rec])
    straight.run(max_epochs=3, stopping_rule=None)
    resumed_model, resumed, resumed_rec = run_interrupted(tmp_path, x, y, stop_at)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert torch.equal(rec.steps, resumed_rec.steps) and rec.steps.tolist() == list(range(3 * 13))
    assert torch.equal(rec.snapshots(), resumed_rec.snapshots())


def test_max_steps_stops_inside_an_epoch_and_run_continues():
    x, y = blobs()
    a = SGDTrainer(mlp((5, 16, 3), seed=0), x, y, batch_size=10)
    a.run(max_epochs=2, stopping_rule=None)
    b_model = mlp((5, 16, 3), seed=0)
    b = SGDTrainer(b_model, x, y, batch_size=10)
    b.run(max_epochs=2, stopping_rule=None, max_steps=5)
    assert b.stopped_by == "max_steps" and b.step == 5 and b.history == []
    b.run(max_epochs=2, stopping_rule=None)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b_model.parameters()))


def test_bad_input_and_a_diverging_run_keep_the_checkpoint(tmp_path):
    x, y = blobs()
    with pytest.raises(ValueError, match="batch_size must be an int in \\[1, 130\\]"):
        SGDTrainer(mlp((5, 3)), x, y, batch_size=0)
    with pytest.raises(ValueError, match="same number of samples"):
        SGDTrainer(mlp((5, 3)), x, y[:5])
    with pytest.raises(ValueError, match="training set is empty"):
        SGDTrainer(mlp((5, 3)), x[:0], y[:0])
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        SGDTrainer(mlp((5, 3)), x, y, lr=float("nan"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        SGDTrainer(mlp((5, 3)), x, y, checkpoint=tmp_path / "none.pt").resume()
    ckpt = tmp_path / "c.pt"
    trainer = SGDTrainer(mlp((5, 3), seed=0), x, y, batch_size=10, checkpoint=ckpt)
    trainer.run(max_epochs=1, stopping_rule=None)
    with pytest.raises(ValueError, match="written with settings"):
        SGDTrainer(mlp((5, 3)), x, y, batch_size=13, checkpoint=ckpt).resume()
    x_bad = x.clone()
    x_bad[7] = float("inf")
    bad = SGDTrainer(mlp((5, 3), seed=0), x_bad, y, batch_size=10, checkpoint=ckpt)
    bad.resume()
    with pytest.raises(FloatingPointError, match="minibatch loss is .* at step"):
        bad.run(max_epochs=3, stopping_rule=None)
    assert SGDTrainer(mlp((5, 3)), x, y, batch_size=10, checkpoint=ckpt).resume().epoch >= 1


class KillReLUs:
    """Sets the first layer so that no ReLU unit is ever active again (the way a burst of large SGD
    steps ends a run at high lr / B) before step ``at``."""

    def __init__(self, at):
        self.at = at

    def before_step(self, trainer, step):
        if step == self.at:
            with torch.no_grad():
                trainer.model[0].weight.fill_(-10.0)


def test_instability_guard_rolls_back_to_the_last_good_epoch(tmp_path):
    x, y = blobs()
    model = mlp((5, 16, 3), seed=0)
    window = WindowRecorder(model, ["2.weight"], 20)
    straight = SGDTrainer(model, x, y, batch_size=10, callbacks=[window])
    straight.run(max_epochs=2, stopping_rule=None)  # 13 steps per epoch
    guarded_model = mlp((5, 16, 3), seed=0)
    guarded_window = WindowRecorder(guarded_model, ["2.weight"], 20)
    ckpt = tmp_path / "c.pt"
    guarded = SGDTrainer(guarded_model, x, y, batch_size=10, callbacks=[guarded_window, KillReLUs(30)], checkpoint=ckpt)
    guarded.run(max_epochs=8, stopping_rule=None, guard=InstabilityGuard(accuracy_drop=0.1, patience=2))
    assert guarded.stopped_by == "unstable" and [r["epoch"] for r in guarded.instability] == [2, 3]
    assert all(r["full_accuracy"] < guarded.history[-1]["full_accuracy"] - 0.1 for r in guarded.instability)
    assert len(guarded.history) == 2 and guarded.step == 26 and guarded.epoch == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), guarded_model.parameters()))
    assert torch.equal(window.snapshots()[1], guarded_window.snapshots()[1])
    reopened = SGDTrainer(mlp((5, 16, 3), seed=5), x, y, batch_size=10,
                          callbacks=[WindowRecorder(mlp((5, 16, 3)), ["2.weight"], 20)], checkpoint=ckpt).resume()
    assert reopened.stopped_by == "unstable" and len(reopened.instability) == 2 and reopened.step == 26


def test_instability_guard_without_the_state_before_the_streak_raises():
    x, y = blobs()
    trainer = SGDTrainer(mlp((5, 16, 3), seed=0), x, y, batch_size=10, callbacks=[KillReLUs(20)])
    trainer.run(max_epochs=1, stopping_rule=None)
    trainer.run(max_epochs=3, stopping_rule=None, max_steps=16)  # stops inside epoch 2: no epoch end kept
    with pytest.raises(FloatingPointError, match="turned unstable in epochs 1 to 1"):
        trainer.run(max_epochs=3, stopping_rule=None, guard=InstabilityGuard(patience=1))


def test_instability_guard_ignores_ordinary_noise():
    guard = InstabilityGuard(accuracy_drop=0.1, patience=2)
    rec = [{"full_loss": 0.1, "full_accuracy": a} for a in (0.5, 0.95, 0.84, 0.9, 0.84)]
    assert guard.streak(rec) == 0  # one bad epoch, recovered
    assert guard.streak(rec + [{"full_loss": 0.1, "full_accuracy": 0.8}]) == 2
    assert guard.streak(rec + [{"full_loss": float("nan"), "full_accuracy": 0.95}]) == 1
