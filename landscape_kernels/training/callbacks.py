"""Training callbacks with checkpointable state (``state_dict`` / ``load_state_dict``), for ``SGDTrainer``.

- ``WindowRecorder``: the last ``window`` snapshots of chosen parameters, taken before every SGD step
  (Feng & Tu 2021), in a ring buffer of fixed size: a long run never holds more than the window.
- ``EpochStates``: a copy of the whole model's parameters at the end of every epoch (for quantities
  along training, e.g. the active temperature T(t) of Feng & Tu 2021).
"""
import torch

from ..kernels.checks import all_finite


class WindowRecorder:
    def __init__(self, model, params, window, dtype=torch.float32):
        named = dict(model.named_parameters())
        missing = [p for p in params if p not in named]
        if missing:
            raise ValueError(f"WindowRecorder: {missing} are not parameters of the model")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"WindowRecorder: window must be a positive int, got {window!r}")
        self.params, self.window = list(params), window
        self._tensors = [named[p] for p in self.params]
        self.num_features = sum(t.numel() for t in self._tensors)
        self.buffer = torch.empty(window, self.num_features, dtype=dtype)
        self.steps = torch.full((window,), -1, dtype=torch.long)
        self.count = 0  # snapshots taken so far (the ring position is count % window)

    def before_step(self, trainer, step):
        row = self.buffer[self.count % self.window]
        offset = 0
        with torch.no_grad():
            for t in self._tensors:
                row[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
                offset += t.numel()
        if not all_finite(row):
            raise FloatingPointError(f"WindowRecorder: NaN/Inf in {self.params} at step {step}")
        self.steps[self.count % self.window] = step
        self.count += 1

    def snapshots(self):
        """(steps (T,), snapshots (T, N)) in time order, T = min(count, window)."""
        n = min(self.count, self.window)
        order = torch.arange(self.count - n, self.count) % self.window
        return self.steps[order].clone(), self.buffer[order].clone()

    def state_dict(self):
        return {"buffer": self.buffer, "steps": self.steps, "count": self.count}

    def load_state_dict(self, state):
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(f"WindowRecorder: the checkpoint's window has shape {tuple(state['buffer'].shape)}, "
                             f"this recorder {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.steps.copy_(state["steps"])
        self.count = int(state["count"])


class EpochStates:
    def __init__(self, model):
        self.model = model
        self.states = []  # (epoch, step, {name: tensor})

    def after_epoch(self, trainer, record):
        self.states.append((record["epoch"], record["step"],
                            {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}))

    def state_dict(self):
        return {"epochs": [e for e, _, _ in self.states], "steps": [s for _, s, _ in self.states],
                "params": [p for _, _, p in self.states]}

    def load_state_dict(self, state):
        self.states = list(zip(state["epochs"], state["steps"], state["params"]))
