"""Per-sample gradient capture, layer 1: hooks and layer rules, and the model/data plumbing above it.

- ``persample``: ``PerSampleGradients``, per-sample statistics from one ordinary backward;
- ``layers``: how each supported layer's per-sample gradients factor into what the kernels take;
- ``model``: ``chosen_parameters``, ``as_batches``, ``eval_mode`` (used by every layer above);
- ``collectives``, ``distributed``: per-sample statistics over the ranks of a process group.
"""
from .model import as_batches, chosen_parameters, eval_mode
from .persample import PerSampleGradients

__all__ = ["PerSampleGradients", "as_batches", "chosen_parameters", "eval_mode"]
