"""The registry of per-sample gradient rules: how the parameters of one module type get their
per-sample gradients from what one forward and backward recorded at that module.

A rule is a callable ``rule(module, call) -> {parameter name: contribution}``, where ``call`` (a
``Call``) holds one forward call of the module (its inputs, keyword inputs and batch size) and the
gradient of the loss with respect to its output, and a contribution is either

- ``Factors(A, D)``: the per-sample gradients G_b = sum_t D[b, t]^T A[b, t] (A of shape (B, T, cols), D
  of shape (B, T, rows), rows x cols the parameter's elements), which the fused kernels consume without
  forming the B x rows x cols tensor; or
- a tensor of shape (B, *parameter shape): the per-sample gradients themselves (for small parameters).

The gradients are those of the batch loss as recorded; ``PerSampleGradients`` scales them to per-sample
losses. Register a rule with ``register_per_sample_rule(module_type, rule)``; ``check=`` gives a
function ``module -> reason or None`` for instances the rule does not cover, ``covers_children=True``
lets the rule answer for the parameters of the module's submodules too (``nn.MultiheadAttention`` uses
its ``out_proj`` weights functionally), ``widen_shared=True`` widens an output computed once for the whole
batch (an embedding of position ids of shape (1, T)) to the batch, so that its gradient keeps the samples
apart. The built-in rules (``capture.layers``) are registered the same
way; docs/guide/per-sample.md shows how to write one.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn


class Factors(NamedTuple):
    """Per-sample gradients G_b = sum_t D[b, t]^T A[b, t] of one parameter (reshaped to its shape)."""

    A: torch.Tensor
    D: torch.Tensor


@dataclass
class Call:
    """One recorded forward call of a hooked module: ``args`` and ``kwargs`` as passed (tensors
    detached), ``grads`` (the gradient of the loss with respect to each tensor of the output, in order,
    None where that tensor did not reach the loss), ``outputs`` (the (shape, dtype, device) of each
    output tensor; the outputs themselves are not kept), and ``batch_size``, the batch size of the
    model's input (None when the module was called outside the model's forward)."""

    args: tuple
    kwargs: dict
    outputs: list
    grads: list
    batch_size: Optional[int]

    @property
    def input(self):
        """The first positional input."""
        return self.args[0]

    @property
    def grad(self):
        """The gradient with respect to the (first tensor of the) output, zeros if it did not reach the loss."""
        g = self.grads[0]
        if g is None:
            shape, dtype, device = self.outputs[0]
            return torch.zeros(shape, dtype=dtype, device=device)
        return g


@dataclass
class Rule:
    fn: Callable
    check: Optional[Callable] = None
    covers_children: bool = False
    widen_shared: bool = False


_REGISTRY = {}  # module type, or "module.QualifiedName" of a class not imported here -> Rule


def register_per_sample_rule(module_type, rule, check=None, covers_children=False, widen_shared=False):
    """Make ``rule`` give the per-sample gradients of the parameters of ``module_type`` (a class, its
    qualified name "package.module.ClassName" for a class this library does not import, or "*Suffix" for
    every class whose name ends so, e.g. "*RMSNorm"; a class or qualified name is looked up first). Subclasses
    use their closest registered base, unless they override ``forward`` (their inputs then need not be
    what the rule expects: such a subclass gets the checked per-sample VJP rule). Registering a type
    again replaces its rule; ``rule=None`` removes it."""
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"register_per_sample_rule: module_type must be an nn.Module subclass or a qualified class "
                        f"name, got {module_type!r}")
    if rule is None:
        _REGISTRY.pop(module_type, None)
        return
    if not callable(rule):
        raise TypeError(f"register_per_sample_rule: rule must be callable (module, call) -> dict, got {rule!r}")
    _REGISTRY[module_type] = Rule(rule, check, bool(covers_children), bool(widen_shared))


def qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(module):
    """The registered ``Rule`` for ``module`` (its class or closest base; classes registered by name
    match by qualified name), or None."""
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls) or _REGISTRY.get(qualified_name(cls))
        if found is not None:
            return found if getattr(type(module), "forward", None) is getattr(cls, "forward", None) else None
    name = type(module).__name__
    for key, found in _REGISTRY.items():
        if isinstance(key, str) and key.startswith("*") and name.endswith(key[1:]):
            return found
    return None
