"""Plain minibatch SGD over a fixed-seed shuffle, with callbacks, the Feng & Tu 2021 stopping rule,
checkpoints and bit-for-bit resume.

The whole dataset sits on the device; epoch e visits the samples in the order of a permutation drawn
from a generator seeded with (seed, e), so the order never depends on what ran before and a run
resumed from a checkpoint (model, optimizer, position inside the epoch, history) continues exactly as
the uninterrupted run would have. Per-step loss and accuracy are accumulated on the device and read
once per epoch, so a step costs its forward, backward and update and nothing more.

Callbacks: a plain callable is called as ``fn(step)`` before every SGD step (a ``TrajectoryRecorder``
is such a callable: Feng & Tu 2021 take a snapshot before every step); an object may instead define
``before_step(trainer, step)`` and/or ``after_epoch(trainer, record)``, where ``record`` is the dict of
the epoch's numbers appended to ``trainer.history``. A callback with ``state_dict`` and
``load_state_dict`` (``training.callbacks``) is saved in the checkpoint and restored on resume.
"""
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..capture.model import eval_mode
from .interrupts import StepBoundary
from .progress import Progress
from .state_files import load_state, save_state

CHECKPOINT_FORMAT = "landscape_kernels.training/1"


@dataclass
class StoppingRule:
    """Feng & Tu's (2021) stopping rule: stop when the mean training accuracy over the last ``window`` epochs exceeds
    ``accuracy`` and the full training loss is below ``loss``."""

    window: int = 9
    accuracy: float = 0.99
    loss: float = 5e-5

    def satisfied(self, history):
        acc = [r["train_accuracy"] for r in history]
        if len(acc) < self.window:
            return False
        return sum(acc[-self.window :]) / self.window > self.accuracy and history[-1]["full_loss"] < self.loss


@dataclass
class InstabilityGuard:
    """Stops a run whose SGD turns unstable and rolls it back to the last epoch before. The run is
    unstable when the full training accuracy of each of the last ``patience`` epochs lies more than
    ``accuracy_drop`` below the best before it, or the full loss is not finite (e.g. at a large lr / B
    the noise first erodes a fitted solution over tens of epochs and then a burst kills every ReLU unit
    for good). The trainer then restores the model, optimizer, history and callback states (the
    recorded window included) of the end of the epoch before that streak and stops with
    ``stopped_by == "unstable"``; the undone epochs' records are kept in ``trainer.instability``.
    Keeping those states costs one copy of the state per epoch and ``patience + 1`` copies of memory."""

    accuracy_drop: float = 0.02
    patience: int = 3

    def streak(self, history):
        """How many of the last epochs to undo: 0 (stable), ``patience`` or 1 (a non-finite loss)."""
        if not math.isfinite(history[-1]["full_loss"]):
            return 1
        accs = [r.get("full_accuracy") for r in history]
        if len(accs) <= self.patience or any(a is None for a in accs):
            return 0
        first = len(accs) - self.patience
        best = max(accs[:first])
        return self.patience if all(a < best - self.accuracy_drop for a in accs[first:]) else 0


def _epoch_order(n, seed, epoch, device):
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).to(device)


class SGDTrainer:
    """Trains ``model`` on (x, y) by minibatch SGD.

    Args:
        model, x, y: the network and the whole training set (moved to ``device``).
        batch_size, lr, momentum: SGD settings (Feng & Tu 2021: 50, 0.1, 0).
        seed: seeds the epoch permutations.
        loss_fn: mean loss over a minibatch (default cross-entropy); accuracy is counted when the
            targets are class indices.
        callbacks: see the module docstring.
        checkpoint: a file path; the state is written there (atomically) at the first epoch end after
            every ``checkpoint_seconds`` of training and whenever ``run`` returns or is interrupted (a
            killed process loses at most that much; the state may be large, e.g. a recorded window).
        drop_last: skip the last, smaller minibatch of an epoch (default False: keep it).
        penalty: None or a callable ``penalty(model)`` returning a scalar added to every minibatch loss
            (e.g. the landscape-dependent constraints of Feng & Tu 2021); the recorded losses exclude it.
        proximal: apply the penalty as an implicit step instead: the optimizer steps on the minibatch
            loss alone, then ``penalty.prox(model, lr)`` (the penalty's exact proximal map) is applied,
            which stays stable however stiff the penalty (an explicit step diverges once lr times its
            curvature exceeds 2).
        optimizer: None (plain ``torch.optim.SGD`` with ``lr`` and ``momentum``) or an optimizer over
            the model's parameters (e.g. ``optim.NSGD``); its first group's lr and momentum are then
            the trainer's.
        lr_schedule: None (constant lr) or a callable ``step -> lr`` set on every parameter group before
            each step (e.g. ``cosine_schedule``); stateless, so a resumed run follows it exactly.
        clip_grad_norm: None or the largest total gradient norm; larger minibatch gradients are scaled
            down to it before the step (``torch.nn.utils.clip_grad_norm_``).
    """

    def __init__(self, model, x, y, batch_size=50, lr=0.1, momentum=0.0, seed=0, loss_fn=F.cross_entropy,
                 callbacks=(), device=None, checkpoint=None, checkpoint_seconds=60.0, drop_last=False, penalty=None,
                 proximal=False, optimizer=None, lr_schedule=None, clip_grad_norm=None):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[0] != y.shape[0]:
            raise ValueError("SGDTrainer: x and y must be tensors with the same number of samples, got "
                             f"{getattr(x, 'shape', type(x))} and {getattr(y, 'shape', type(y))}")
        if x.shape[0] == 0:
            raise ValueError("SGDTrainer: the training set is empty")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= x.shape[0]:
            raise ValueError(f"SGDTrainer: batch_size must be an int in [1, {x.shape[0]}] (the dataset size), got {batch_size!r}")
        if optimizer is not None:
            lr, momentum = optimizer.param_groups[0]["lr"], optimizer.param_groups[0].get("momentum", 0.0)
        if not float(lr) > 0 or not math.isfinite(float(lr)):
            raise ValueError(f"SGDTrainer: lr must be a positive finite number, got {lr!r}")
        if not 0 <= float(momentum) < 1:
            raise ValueError(f"SGDTrainer: momentum must be in [0, 1), got {momentum!r}")
        if lr_schedule is not None and not callable(lr_schedule):
            raise ValueError(f"SGDTrainer: lr_schedule must be None or a callable step -> lr, got {lr_schedule!r}")
        if clip_grad_norm is not None and not float(clip_grad_norm) > 0:
            raise ValueError(f"SGDTrainer: clip_grad_norm must be None or a positive number, got {clip_grad_norm!r}")
        self.lr_schedule, self.clip_grad_norm = lr_schedule, clip_grad_norm
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size, self.lr, self.momentum, self.seed = batch_size, float(lr), float(momentum), int(seed)
        self.loss_fn, self.drop_last, self.penalty = loss_fn, drop_last, penalty
        if proximal and not callable(getattr(penalty, "prox", None)):
            raise ValueError("SGDTrainer: proximal=True needs a penalty with a prox(model, lr) method, got "
                             f"{type(penalty).__name__}")
        self.proximal = bool(proximal)
        self.callbacks = list(callbacks)
        self.checkpoint, self.checkpoint_seconds = checkpoint, float(checkpoint_seconds)
        self._last_save = time.perf_counter()
        self.optimizer = optimizer or torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)
        self.classification = self.y.dtype == torch.long and self.y.dim() == 1
        n = self.x.shape[0]
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self.epoch, self.batch_index, self.step = 0, 0, 0  # position: the next step to take
        self.history = []
        self.stopped_by = None
        self.instability = None  # the records of the epochs an InstabilityGuard rolled back
        self._acc = None  # this epoch's running sums on the device: loss, correct, samples
        self._epoch_seconds = 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self):
        settings = {"batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum, "seed": self.seed,
                    "samples": int(self.x.shape[0]), "drop_last": self.drop_last}
        if self.clip_grad_norm is not None:  # only when set, so older checkpoints still resume
            settings["clip_grad_norm"] = float(self.clip_grad_norm)
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "batch_index": self.batch_index, "step": self.step,
                "history": self.history, "accumulators": None if self._acc is None else self._acc.cpu(),
                "epoch_seconds": self._epoch_seconds, "stopped_by": self.stopped_by, "instability": self.instability,
                "callbacks": [cb.state_dict() for cb in self._stateful_callbacks()],
                "settings": settings}

    def save(self, path=None):
        """Write the state to ``path`` (default: the checkpoint path) via a temporary file and a rename."""
        save_state(self.state_dict(), path or self.checkpoint)
        self._last_save = time.perf_counter()

    def resume(self, path=None):
        """Load a checkpoint written by ``save``; the settings must match this trainer's. Returns self."""
        path = os.fspath(path or self.checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SGDTrainer.resume: no checkpoint at {path!r}")
        state = load_state(path, "SGDTrainer.resume", map_location=self.device)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"SGDTrainer.resume: {path!r} is not a landscape_kernels training checkpoint")
        mine = self.state_dict()["settings"]
        if state["settings"] != mine:
            raise ValueError(f"SGDTrainer.resume: {path!r} was written with settings {state['settings']}, "
                             f"this trainer has {mine}")
        self.load_state_dict(state)
        return self

    def load_state_dict(self, state):
        """Restore a ``state_dict`` (no settings check: ``resume`` does that for files)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_index, self.step = state["epoch"], state["batch_index"], state["step"]
        self.history = state["history"]
        acc = state["accumulators"]
        self._acc = None if acc is None else acc.to(self.device)
        self._epoch_seconds = state["epoch_seconds"]
        self.stopped_by, self.instability = state.get("stopped_by"), state.get("instability")
        saved, mine = state["callbacks"], self._stateful_callbacks()
        if len(saved) != len(mine):
            raise ValueError(f"SGDTrainer.load_state_dict: the state holds {len(saved)} callbacks, this trainer has "
                             f"{len(mine)} callbacks with state")
        for cb, cb_state in zip(mine, saved):
            cb.load_state_dict(cb_state)

    def _stateful_callbacks(self):
        return [cb for cb in self.callbacks if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, x=None, y=None, chunk=8192):
        """(mean loss, accuracy or None) of the model in eval mode over (x, y), default the training set."""
        x = self.x if x is None else x.to(self.device)
        y = self.y if y is None else y.to(self.device)
        with eval_mode(self.model):
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for i in range(0, x.shape[0], chunk):
                out = self.model(x[i : i + chunk])
                loss += self.loss_fn(out, y[i : i + chunk]).double() * out.shape[0]
                if self.classification:
                    correct += (out.argmax(1) == y[i : i + chunk]).sum()
        return float(loss) / x.shape[0], (int(correct) / x.shape[0] if self.classification else None)

    # ------------------------------------------------------------------ training
    def _callbacks_before_step(self):
        for cb in self.callbacks:
            if hasattr(cb, "before_step"):
                cb.before_step(self, self.step)
            elif callable(cb) and not hasattr(cb, "after_epoch"):
                cb(self.step)

    def _sgd_step(self, idx):
        xb, yb = self.x[idx], self.y[idx]
        self._callbacks_before_step()
        out = self.model(xb)
        loss = self.loss_fn(out, yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SGDTrainer: the minibatch loss is {float(loss.detach())} at step {self.step} "
                                     f"(epoch {self.epoch}); the last checkpoint and recorded data are kept")
        self.optimizer.zero_grad(set_to_none=True)
        explicit = self.penalty is not None and not self.proximal
        (loss + self.penalty(self.model) if explicit else loss).backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_grad_norm))
        if self.lr_schedule is not None:
            lr = float(self.lr_schedule(self.step))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        if self.proximal:
            self.penalty.prox(self.model, self.optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            self._acc[0] += loss.detach().double() * xb.shape[0]
            if self.classification:
                self._acc[1] += (out.argmax(1) == yb).sum()
            self._acc[2] += xb.shape[0]
        self.step += 1

    def _finish_epoch(self):
        loss_sum, correct, seen = (float(v) for v in self._acc.cpu())
        full_loss, full_acc = self.evaluate()
        record = {"epoch": self.epoch, "step": self.step, "train_loss": loss_sum / seen,
                  "train_accuracy": correct / seen if self.classification else None,
                  "full_loss": full_loss, "full_accuracy": full_acc, "seconds": self._epoch_seconds}
        self.history.append(record)
        for cb in self.callbacks:
            if hasattr(cb, "after_epoch"):
                cb.after_epoch(self, record)
        self.epoch, self.batch_index, self._acc, self._epoch_seconds = self.epoch + 1, 0, None, 0.0
        return record

    def _rollback(self, kept, undo):
        """Back to the kept state of the end of the epoch ``undo`` epochs ago, keeping what was undone."""
        target = len(self.history) - undo
        state = next((st for n, st in kept if n == target), None)
        if state is None:
            raise FloatingPointError(f"SGDTrainer: SGD turned unstable in epochs {target} to {len(self.history) - 1} "
                                     f"(last full loss {self.history[-1]['full_loss']:.3g}, accuracy "
                                     f"{self.history[-1]['full_accuracy']}) and the state before them is not kept "
                                     "(the run started or resumed later)")
        undone = self.history[target:]
        self.load_state_dict(state)
        self.stopped_by, self.instability = "unstable", undone

    def run(self, max_epochs=1000, stopping_rule="paper", max_steps=None, progress=False, guard=None):
        """Train until ``stopping_rule`` holds at an epoch end (None: never), ``max_epochs`` epochs are
        done, or ``max_steps`` steps in total are taken (which may stop inside an epoch; ``run`` can be
        called again to continue). ``stopping_rule`` "paper" (the default) is ``StoppingRule()`` (Feng & Tu 2021); ``guard``
        an ``InstabilityGuard`` (None: none). Returns ``self.history``; ``self.stopped_by`` says why
        it stopped."""
        if stopping_rule in ("paper", "spec"):  # "spec": the name of earlier versions
            stopping_rule = StoppingRule()
        kept = []  # (epochs done, state copy) of the last guard.patience + 1 epoch ends
        if guard is not None and self.batch_index == 0:
            kept.append((len(self.history), copy.deepcopy(self.state_dict())))
        bar = Progress(max_epochs, self.epoch, "SGD", "epoch") if progress else None
        self.model.train()
        self.stopped_by = None
        with StepBoundary() as boundary:  # Ctrl-C / SIGTERM take effect between steps, never inside one
            try:
                while self.stopped_by is None:
                    if self.epoch >= max_epochs:
                        self.stopped_by = "max_epochs"
                        break
                    order = _epoch_order(self.x.shape[0], self.seed, self.epoch, self.device)
                    if self._acc is None:
                        self._acc = torch.zeros(3, dtype=torch.float64, device=self.device)
                    while self.batch_index < self.steps_per_epoch:
                        if max_steps is not None and self.step >= max_steps:
                            self.stopped_by = "max_steps"
                            break
                        b = self.batch_index * self.batch_size
                        with boundary.step():
                            t0 = time.perf_counter()
                            self._sgd_step(order[b : b + self.batch_size])
                            self.batch_index += 1
                            self._epoch_seconds += time.perf_counter() - t0
                    if self.stopped_by:
                        break
                    with boundary.step():
                        record = self._finish_epoch()
                        undo = guard.streak(self.history) if guard is not None else 0
                        if undo:
                            self._rollback(kept, undo)
                        elif stopping_rule is not None and stopping_rule.satisfied(self.history):
                            self.stopped_by = "stopping_rule"
                        elif self.checkpoint and time.perf_counter() - self._last_save >= self.checkpoint_seconds:
                            self.save()
                        if guard is not None and self.stopped_by is None:
                            kept = kept[-guard.patience :] + [(len(self.history), copy.deepcopy(self.state_dict()))]
                    if bar is not None:
                        bar.update(1, loss=f"{record['full_loss']:.3g}", acc=f"{record['train_accuracy'] or 0:.4f}")
            finally:  # also on an interruption: what was done is kept (unless a second signal tore a step)
                with boundary.step():
                    if bar is not None:
                        bar.close()
                    if self.checkpoint and not boundary.torn:
                        self.save()
                    for cb in self.callbacks:
                        if hasattr(cb, "flush"):
                            cb.flush()
        return self.history


def cosine_schedule(lr, epochs, steps_per_epoch, final_fraction=0.01):
    """step -> lr decaying from ``lr`` to ``final_fraction * lr`` along a half cosine over ``epochs``
    epochs, constant within an epoch (PyTorch's CosineAnnealingLR stepped per epoch), then held."""
    if not epochs >= 1 or not steps_per_epoch >= 1:
        raise ValueError(f"cosine_schedule: epochs and steps_per_epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    low = lr * final_fraction

    def schedule(step):
        epoch = min(step // steps_per_epoch, epochs)
        return low + (lr - low) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    return schedule
