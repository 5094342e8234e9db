"""Ctrl-C and SIGTERM take effect between SGD steps: the checkpoint of an interrupted run is consistent
and its resume equals the uninterrupted run (the signal is sent from inside a step, deterministically)."""
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from landscape_kernels.training.callbacks import WindowRecorder
from landscape_kernels.training.interrupts import StepBoundary, TrainingInterrupted
from landscape_kernels.training.models import mlp
from landscape_kernels.training.trainer import SGDTrainer


def _data(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 6, generator=g) + 2.0 * F.one_hot(y, 6).float(), y


class SignalAt:
    """A callback that sends ``signum`` to this process before step ``step`` (``times`` signals)."""

    def __init__(self, step, signum=signal.SIGINT, times=1):
        self.step, self.signum, self.times = step, signum, times

    def before_step(self, trainer, step):
        if step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                sum(range(10000))  # Python runs the handler before the next signal (signals do not queue)


def _trainer(checkpoint, extra=()):
    model = mlp((6, 8, 3), seed=0)
    window = WindowRecorder(model, ["0.weight"], 40)
    trainer = SGDTrainer(model, *_data(), batch_size=10, lr=0.1, callbacks=[window, *extra], checkpoint=checkpoint)
    return trainer, window


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_step_stops_after_it_and_the_resumed_run_equals_the_uninterrupted(tmp_path, signum):
    full, full_window = _trainer(str(tmp_path / "full.pt"))
    full.run(max_epochs=4, stopping_rule=None)
    # the signal arrives after the window's snapshot of step 13 and before its update
    cut, _ = _trainer(str(tmp_path / "cut.pt"), [SignalAt(13, signum)])
    with pytest.raises(TrainingInterrupted) as info:
        cut.run(max_epochs=4, stopping_rule=None)
    assert info.value.signum == signum and cut.step == 14  # step 13 was completed
    resumed, window = _trainer(str(tmp_path / "cut.pt"))
    resumed.resume().run(max_epochs=4, stopping_rule=None)
    steps, snaps = window.snapshots()
    want_steps, want = full_window.snapshots()
    assert torch.equal(steps, want_steps) and torch.equal(snaps, want)  # no step recorded twice
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()))
    assert resumed.history == [{**r, "seconds": s["seconds"]} for r, s in zip(full.history, resumed.history)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_second_signal_breaks_off_the_step_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    first, _ = _trainer(str(path))
    first.run(max_epochs=1, stopping_rule=None)
    before = path.read_bytes()
    again, _ = _trainer(str(path), [SignalAt(12, times=2)])
    again.resume()
    with pytest.raises(TrainingInterrupted, match="twice"):
        again.run(max_epochs=3, stopping_rule=None)
    assert path.read_bytes() == before  # the torn state is not written over the consistent one


def test_a_programs_own_handler_is_left_alone(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        trainer, _ = _trainer(None, [SignalAt(3)])
        trainer.run(max_epochs=1, stopping_rule=None)  # its handler runs; training goes on
        assert seen == [signal.SIGINT] and trainer.stopped_by == "max_epochs"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_boundary_holds_a_signal_only_inside_a_step():
    with StepBoundary() as boundary:
        with pytest.raises(TrainingInterrupted):
            with boundary.step():
                os.kill(os.getpid(), signal.SIGINT)
                held = boundary.pending
        assert held == signal.SIGINT and boundary.pending is None
        with pytest.raises(TrainingInterrupted, match="training interrupted"):
            os.kill(os.getpid(), signal.SIGINT)
