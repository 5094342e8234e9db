"""The networks of the reproduced papers.

``mlp`` is the SPEC §1.1 network by default (784 -> 50 -> 50 -> 10, ReLU, no biases, PyTorch default
initialisation): an ``nn.Sequential`` whose Linear layers sit at even indices, so the hidden->hidden
matrix W2 is the parameter "2.weight". ``simple_cnn`` is the SPEC §2.3 SimpleCNN for 28 x 28 inputs
given as flat (B, 784) rows. Both are plain ``nn.Sequential`` models, so the fast paths of the
operators (R-operator Hessian products) and of ``loss_profiles`` apply to the MLP.
"""
import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(widths=(784, 50, 50, 10), bias=False, activation="relu", seed=None):
    """Fully connected network with the given layer widths (input, hidden..., output).

    ``seed``: the initialisation is drawn from a generator seeded with it (None: the global RNG), so
    two calls with one seed give identical networks without touching the global random state."""
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"mlp: widths must list at least an input and an output width, all >= 1, got {widths}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")

    def build():
        layers = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(n_in, n_out, bias=bias))
        return nn.Sequential(*layers)

    return _seeded(build, seed)


def simple_cnn(num_classes=10, seed=None):
    """SPEC §2.3 SimpleCNN on 28 x 28 images given as (B, 784) rows: 2 x Conv(32, 3) + ReLU, MaxPool 2,
    2 x Conv(64, 3) + ReLU, MaxPool 2, Linear 1024 -> 128 + ReLU, Linear 128 -> ``num_classes``."""
    return _seeded(lambda: nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, num_classes)), seed)


def _seeded(build, seed):
    """``build()`` with PyTorch's default initialisation drawn from the global generator (seed None) or
    from one seeded with ``seed`` inside a forked RNG state (the caller's random stream is untouched)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()
