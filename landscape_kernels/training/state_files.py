"""Torch state files and JSON results written atomically and read back without pickle, with one clear
error when damaged."""
import json
import os
import pickle

import numpy as np
import torch


def jsonable(v):
    """numpy scalars and arrays and torch tensors as JSON values (the ``default`` of ``json.dump``)."""
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def write_json(path, value, indent=1):
    """``value`` as JSON at ``path``, written to a temporary file and renamed (never half written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent, default=jsonable)
    os.replace(tmp, path)


def read_json(path):
    """A result written by ``write_json``; a damaged file is one clear error naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: not a readable result file ({exc}); remove it to compute it "
                             "again") from exc


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
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # not a torch file: pickle's error
        detail = str(exc).splitlines()[0] if str(exc) else "it ends early"
        raise ValueError(f"{owner}: {os.fspath(path)!r} is not a readable state file ({type(exc).__name__}: {detail}); "
                         "it is truncated or damaged: remove it to compute it again") from exc
