"""Model checkpoints from disk, without pickle: a ``state_dict`` saved by ``torch.save`` (read with
``weights_only=True``; a training checkpoint that holds it under "model", "state_dict",
"model_state_dict" or "model_state" is accepted too) or a safetensors file; and a folder of them as a
series along training, in the natural order of their names (step_2 before step_10)."""
import os
import re

import torch

from .state_files import load_state

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
NESTED_KEYS = ("model", "state_dict", "model_state_dict", "model_state")


def read_state_dict(path):
    """{name: tensor} from a checkpoint file; a missing, damaged or foreign file is a ValueError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError(f"checkpoint {path!r}: reading safetensors needs the safetensors package "
                             "(pip install safetensors)") from exc
        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise ValueError(f"checkpoint {path!r}: not a readable safetensors file ({exc})") from exc
    state = load_state(path, "checkpoint", map_location="cpu")
    if isinstance(state, dict) and not _all_tensors(state):
        nested = [k for k in NESTED_KEYS if isinstance(state.get(k), dict) and _all_tensors(state[k])]
        if not nested:
            raise ValueError(f"checkpoint {path!r}: expected a state_dict (parameter name -> tensor), or one under "
                             f"{NESTED_KEYS}; found keys {sorted(map(str, state))[:8]}")
        state = state[nested[0]]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"checkpoint {path!r}: expected a non-empty state_dict, got {type(state).__name__}")
    return state


def _all_tensors(d):
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_checkpoint(model, path):
    """Load the checkpoint at ``path`` into ``model`` (in place, in the model's dtype and device); names
    and shapes must match exactly, else a ValueError lists what differs."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    tied = set(missing) & _tied_names(model)
    missing = [k for k in missing if k not in tied]  # a tied copy (lm_head.weight) may be saved once
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                 f"wrong shapes {wrong[:5]}" if wrong else ""]
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=False)
    return model


def _tied_names(model):
    """State-dict names that share storage with an earlier name (tied weights)."""
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


def natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def checkpoint_series(folder):
    """The checkpoint files of ``folder`` (by suffix: .pt, .pth, .bin, .safetensors) in natural order."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoints {folder!r}: not a folder")
    files = sorted((f for f in os.listdir(folder) if f.endswith(SUFFIXES) and os.path.isfile(os.path.join(folder, f))),
                   key=natural_key)
    if not files:
        raise ValueError(f"checkpoints {folder!r}: no checkpoint files ({', '.join(SUFFIXES)}) in it")
    return [os.path.join(folder, f) for f in files]
