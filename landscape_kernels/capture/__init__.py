"""Per-sample gradient capture, layer 1: hooks and layer rules, and the model/data plumbing above it.

- ``persample``: ``PerSampleGradients``, per-sample statistics from one ordinary backward;
- ``rules``: the registry of per-sample rules (``register_per_sample_rule``, ``Factors``, ``Call``);
- ``layers``: the built-in rules (Linear, transformers' Conv1D, ConvNd, Embedding, the norms);
- ``sample_vjp``: the exact per-sample vector-Jacobian rule (MultiheadAttention, any other module);
- ``fallback``: whole-model per-sample gradients for fallback="vmap" (torch.func, or a loop);
- ``model``: ``chosen_parameters``, ``as_batches``, ``call_model``, ``model_output``, ``eval_mode``;
- ``collectives``, ``distributed``: per-sample statistics over the ranks of a process group.
"""
from . import layers, sample_vjp  # noqa: F401  (importing them registers the built-in rules)
from .model import as_batches, call_model, chosen_parameters, eval_mode, model_output
from .persample import PerSampleGradients
from .rules import Call, Factors, register_per_sample_rule

__all__ = ["Call", "Factors", "PerSampleGradients", "as_batches", "call_model", "chosen_parameters", "eval_mode",
           "model_output", "register_per_sample_rule"]
