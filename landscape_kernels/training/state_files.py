"""Torch state files written atomically and read back without pickle, with one clear error when damaged."""
import os

import torch


def save_state(state, path):
    """``torch.save`` to a temporary name, then a rename: ``path`` is always the old or the new state."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path, owner, map_location=None):
    """``torch.load(weights_only=True)`` (tensors and plain containers only; no pickle runs); a truncated or
    damaged file is a ValueError naming it and ``owner`` (the function that reads it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "it ends early"
        raise ValueError(f"{owner}: {os.fspath(path)!r} is not a readable state file ({type(exc).__name__}: {detail}); "
                         "it is truncated or damaged: remove it to compute it again") from exc
