"""Valley changes along SGD training and transient freezing (Yang et al., arXiv 2601.10962);
``docs/reproductions/flat-valley.md``.

Two readings of "SGD changed valley between two snapshots theta_a and theta_b":

- the straight path: the loss along (1 - t) theta_a + t theta_b rises above the line between the
  ends' losses (``path_barrier``, all points in one pass of ``loss_profiles``): a barrier separates the
  two points;
- the trajectory: the loss SGD itself went through between the snapshots (recorded every few steps
  on the same fixed data) rose above that line (``trajectory_barrier``): SGD climbed over something.

``ValleyWatch`` is an ``SGDTrainer`` callback recording both. The rule of this project (the paper
gives none we could check): an interval is an *escape* when SGD climbed a trajectory barrier higher
than ``threshold`` (in units of the initial loss) and the sharpness lambda_1 at its end is lower than
at its start by at least the fraction ``drop`` (it left a sharper region); the *freezing time* is the
end of the last escape (the first snapshot when there is none).
"""
from dataclasses import asdict, dataclass

import torch

from ..capture.model import as_batches, chosen_parameters, eval_mode, flat_values
from ..linalg.profiles import loss_profiles


@dataclass
class PathBarrier:
    """The losses at ``points`` evenly spaced points of the path (ends included), the barrier height
    max(inner) - max(ends) (0 when the path never rises above its ends) and its ``relative`` size
    height / max(ends)."""

    losses: list
    height: float
    relative: float

    def to_dict(self):
        return asdict(self)


def path_barrier(model, loss_fn, data, direction, points=9, params=None, batch_size=None):
    """The loss along theta -> theta + ``direction`` ((P,) over the chosen ``params``, flattened in model
    order), theta the model's weights, on ``data`` ((x, y) or batches); a ``PathBarrier``."""
    if not isinstance(points, int) or points < 3:
        raise ValueError(f"path_barrier: points must be an int >= 3 (the ends and at least one inner point), got {points!r}")
    offsets = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    losses = loss_profiles(model, loss_fn, data, direction.reshape(1, -1), offsets, params=params,
                           batch_size=batch_size)[0]
    line = losses[0] + offsets * (losses[-1] - losses[0])  # the ends' losses interpolated
    height = max(float((losses - line)[1:-1].max()), 0.0)
    scale = 0.5 * float(losses[0] + losses[-1])
    return PathBarrier(losses.tolist(), height, height / scale if scale > 0 else (float("inf") if height > 0 else 0.0))


def trajectory_barrier(losses):
    """Height of the recorded losses above the straight line between the first and the last (a
    sequence recorded at equal step spacing), 0 when they never rise above it."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if losses.numel() < 3:
        return 0.0
    t = torch.linspace(0.0, 1.0, losses.numel(), dtype=torch.float64)
    return max(float((losses - (losses[0] + t * (losses[-1] - losses[0])))[1:-1].max()), 0.0)


class ValleyWatch:
    """``SGDTrainer`` callback on the fixed ``data``: the loss every ``loss_every`` steps, and every
    ``every`` steps (a multiple of ``loss_every``) one record per interval since the previous snapshot:
    the straight-path barrier (``path_barrier``, ``points`` points) and the trajectory barrier of the
    losses recorded inside it. Its state (the last snapshot, the losses, the records) is checkpointed
    with the trainer."""

    def __init__(self, model, loss_fn, data, every, loss_every, points=9, params=None, batch_size=None):
        for name, v in (("every", every), ("loss_every", loss_every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ValleyWatch: {name} must be a positive int (steps), got {v!r}")
        if every % loss_every:
            raise ValueError(f"ValleyWatch: every ({every}) must be a multiple of loss_every ({loss_every})")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.loss_every, self.points, self.batch_size = every, loss_every, points, batch_size
        self.param_names, self.params = chosen_parameters(model, params)
        self.previous = None  # (P,) weights of the last snapshot
        self.previous_step = None
        self.losses = []  # (step, loss) every loss_every steps
        self.history = []

    def current_loss(self):
        total, count = 0.0, 0
        with torch.no_grad(), eval_mode(self.model):
            for x, y in as_batches(self.data, self.batch_size):
                total += float(self.loss_fn(self.model(x), y)) * y.shape[0]
                count += y.shape[0]
        return total / count

    def before_step(self, trainer, step):
        if step % self.loss_every == 0:
            self.losses.append((step, self.current_loss()))
        if step % self.every == 0:
            self.snapshot(step, trainer.epoch)

    def snapshot(self, step, epoch=None):
        """Measure the interval since the previous snapshot (if any) and make this the new one."""
        theta = flat_values(self.params)
        if self.previous is not None:
            straight = path_barrier(self.model, self.loss_fn, self.data, self.previous.to(theta) - theta, self.points,
                                    params=self.param_names, batch_size=self.batch_size)
            inside = [v for s, v in self.losses if self.previous_step <= s <= step]
            self.history.append({"from_step": self.previous_step, "step": step, "epoch": epoch,
                                 "straight": straight.height, "straight_relative": straight.relative,
                                 "trajectory": trajectory_barrier(inside), "loss": inside[-1] if inside else None})
        self.previous, self.previous_step = theta, step

    def state_dict(self):
        return {"previous": self.previous, "previous_step": self.previous_step, "losses": self.losses,
                "history": self.history}

    def load_state_dict(self, state):
        self.previous, self.previous_step = state["previous"], state["previous_step"]
        self.losses, self.history = [tuple(v) for v in state["losses"]], state["history"]


@dataclass
class Freezing:
    """Escapes and the freezing time of one run (see the module docstring): ``escape_times`` the ends of
    the escape intervals, ``time`` the freezing time, ``early_share`` the share of escapes in the first
    half of the run."""

    escape_times: list
    count: int
    time: float
    early_share: float
    threshold: float
    drop: float

    def to_dict(self):
        return asdict(self)


def freezing(times, barriers, sharpness, threshold, drop=0.1, start=None):
    """``Freezing`` from consecutive intervals: their end ``times``, their ``barriers`` (one per
    interval) and the sharpness at every snapshot (one more than intervals, the first at ``start``,
    default the first time). An interval is an escape when its barrier exceeds ``threshold`` and the
    sharpness falls over it by at least the fraction ``drop``."""
    times = [float(t) for t in times]
    if not times or len(barriers) != len(times) or len(sharpness) != len(times) + 1:
        raise ValueError(f"freezing: need one barrier per interval and one sharpness per snapshot (intervals + 1), "
                         f"got {len(times)} times, {len(barriers)} barriers, {len(sharpness)} sharpness values")
    if not threshold > 0 or not 0 <= drop < 1:
        raise ValueError(f"freezing: threshold must be positive and drop in [0, 1), got {threshold!r}, {drop!r}")
    escapes = [t for t, b, lo, hi in zip(times, barriers, sharpness[:-1], sharpness[1:])
               if b > threshold and hi <= (1 - drop) * lo]
    first = times[0] if start is None else float(start)
    middle = 0.5 * (first + times[-1])
    return Freezing(escapes, len(escapes), escapes[-1] if escapes else first,
                    sum(t <= middle for t in escapes) / len(escapes) if escapes else float("nan"), float(threshold),
                    float(drop))
