"""The model an ``analyse`` run looks at: a built-in preset or the user's ``module:function``, on the
device, dtype and samples asked for.

The function takes no arguments and returns ``(model, loss_fn, data)`` or a dict with those keys (and
optionally ``output_fn`` and ``params``): ``data`` is an (inputs, targets) pair or an iterable of such
batches, inputs a tensor, tuple or dict. ``module`` is an importable name (``mypkg.models``; the
current folder is searched first) or a path to a ``.py`` file."""
import importlib
import importlib.util
import os
import sys
from typing import NamedTuple

import torch

from ..capture.model import as_batches, batch_size_of, cast_floating, slice_batch
from ..training.presets import PRESETS

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class UserModel(NamedTuple):
    model: torch.nn.Module
    loss_fn: object
    batches: list
    output_fn: object = None
    params: object = None
    source: str = ""


def model_function(spec):
    """The callable ``spec`` ("pkg.module:function" or "path/to/file.py:function") names."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build or ./build.py:build")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise ValueError(f"--model {spec!r}: no file {module_name!r}")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0], module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"--model {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


def build_user_model(preset=None, spec=None):
    """Call the preset or the user's function and check what it returned."""
    source = f"preset {preset}" if preset else spec
    fn = PRESETS[preset] if preset else model_function(spec)
    try:
        made = fn()
    except Exception as exc:
        raise ValueError(f"{'--preset ' + preset if preset else '--model ' + spec}: the model function failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    if isinstance(made, dict):
        unknown = set(made) - {"model", "loss_fn", "data", "output_fn", "params"}
        if unknown or not {"model", "loss_fn", "data"} <= set(made):
            raise ValueError(f"--model {spec!r}: the returned dict needs the keys model, loss_fn, data (optional "
                             f"output_fn, params); got {sorted(made)}")
        model, loss_fn, data = made["model"], made["loss_fn"], made["data"]
        output_fn, params = made.get("output_fn"), made.get("params")
    elif isinstance(made, (tuple, list)) and len(made) == 3:
        (model, loss_fn, data), output_fn, params = made, None, None
    else:
        raise ValueError(f"--model {spec!r}: the function must return (model, loss_fn, data) or a dict with those keys; "
                         f"got {type(made).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec!r}: the model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"--model {spec!r}: loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        batches = as_batches(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model {spec or preset!r}: {exc}") from exc
    return UserModel(model, loss_fn, batches, output_fn, params, source)


def first_samples(batches, n):
    """The first ``n`` samples of the batches (the last batch cut), the same on every run."""
    return batches if n is None else sample_range(batches, 0, int(n))


def sample_range(batches, start, stop):
    """Samples ``start:stop`` of the batches, counted across them (batches cut at the ends)."""
    out, offset = [], 0
    for x, y in batches:
        b = batch_size_of(x)
        lo, hi = max(start - offset, 0), min(stop - offset, b)
        if lo < hi:
            out.append((x, y) if (lo, hi) == (0, b) else (slice_batch(x, lo, hi), y[lo:hi]))
        offset += b
        if offset >= stop:
            break
    return out


def rank_share(batches, rank, world):
    """Rank ``rank``'s contiguous share of the samples (the sizes differ by at most one)."""
    total = sum(batch_size_of(x) for x, _ in batches)
    return sample_range(batches, rank * total // world, (rank + 1) * total // world)


def _on_device(value, device):
    """Model inputs or targets (a tensor, or a tuple, list or dict of them) moved to ``device``."""
    if isinstance(value, dict):
        return {k: _on_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_on_device(v, device) for v in value)
    return value.to(device) if isinstance(value, torch.Tensor) else value


def prepared(user, samples=None, device="cpu", dtype=None):
    """The model and its first ``samples`` samples on ``device`` in ``dtype`` (None: the model's own)."""
    model = user.model.to(device=device, dtype=DTYPES[dtype]) if dtype else user.model.to(device)
    model.eval()
    dt = next(model.parameters()).dtype  # floating inputs follow the model's dtype, targets --dtype's
    batches = []
    for x, y in first_samples(user.batches, samples):
        y = _on_device(y, device)
        batches.append((cast_floating(_on_device(x, device), dt), cast_floating(y, dt) if dtype else y))
    return user._replace(model=model, batches=batches)
