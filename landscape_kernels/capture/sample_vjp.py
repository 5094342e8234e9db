"""The exact per-sample rule for any module that treats the samples of a batch independently.

For one recorded call of a module with inputs x and output gradient D, the per-sample gradient of its
parameters is the vector-Jacobian product of the module on sample b alone, d<module(x_b), D_b>/dtheta,
which ``torch.func`` evaluates for every b at once (``vmap`` of ``grad``, each sample passed as a batch
of one). It re-runs the module's forward per sample (cost: about one forward and backward of that module
on the batch), and forms the B x (its parameters) gradients explicitly, so it suits small parameters and
modules without a factor rule: the RMS norms of transformers models, ``nn.MultiheadAttention`` (which
uses its projection weights functionally), or a module owning a bare ``nn.Parameter`` (ViT's class token
and position embeddings).

For a module type no rule is registered for, ``generic_rule`` applies it with the batch dimension
found from the shapes and checks the result: the per-sample gradients must sum to the batch gradient of
the same call, otherwise the error names the module and the alternatives (a registered rule, or
``fallback="vmap"`` over the whole model).
"""
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import tensors_in
from .rules import register_per_sample_rule

SAMPLE_CHUNK = 32  # samples per vmapped evaluation


def stochastic_reason(module):
    """Why re-running ``module`` per sample would not reproduce the recorded forward (None if it would)."""
    for m in module.modules():
        if m.training and ((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                           or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)):
            return "dropout in training mode (call model.eval())"
    return None


def _dims(values, B):
    """Batch dimension 0 for tensors whose leading size is the batch size, None for the others."""
    return tuple(0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else None for v in values)


def sample_vjp_gradients(module, call, names, arg_dims=None, kwarg_dims=None, out_dims=None):
    """{name: (B, *shape)} per-sample gradients of ``module``'s parameters ``names`` (names relative to
    the module, children's included) for one recorded ``call``. ``arg_dims`` / ``kwarg_dims`` /
    ``out_dims``: the batch dimension of each positional input, keyword input and output tensor (None:
    shared by the batch); by default dim 0 where the leading size is the batch size."""
    B = call.batch_size or call.args[0].shape[0]
    args, kwargs = tuple(call.args), dict(call.kwargs)
    arg_dims = _dims(args, B) if arg_dims is None else tuple(arg_dims)
    keys = list(kwargs)
    kw_values = tuple(kwargs[k] for k in keys)
    kw_dims = _dims(kw_values, B) if kwarg_dims is None else tuple(kwarg_dims.get(k) for k in keys)
    grads = tuple(call.grads)
    out_dims = (0,) * len(grads) if out_dims is None else tuple(out_dims)
    grad_dims = tuple(None if g is None else d for g, d in zip(grads, out_dims))
    params = dict(module.named_parameters())
    chosen = {n: params[n].detach() for n in names}

    def widen(values, dims):
        return tuple(v.unsqueeze(d) if d is not None else v for v, d in zip(values, dims))

    def objective(p, a, kw, gs):
        out = functional_call(module, p, widen(a, arg_dims), dict(zip(keys, widen(kw, kw_dims))), strict=False)
        total = 0
        for o, g, d in zip(tensors_in(out), gs, out_dims):
            if g is not None:
                total = total + (o * g.unsqueeze(d)).sum()
        return total

    per_sample = vmap(grad(objective), in_dims=(None, arg_dims, kw_dims, grad_dims), chunk_size=SAMPLE_CHUNK)
    # the module's other parameters are constants here (grad transforms see through no_grad); attention on
    # its math backend, which vmap batches (the fused kernels have no batching rule: a slow loop)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return per_sample(chosen, args, kw_values, grads)


def batch_vjp_gradients(module, call, names):
    """{name: shape} the gradients of <module(call inputs), call grads> for the whole batch at once."""
    params = dict(module.named_parameters())
    chosen = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        out = functional_call(module, chosen, tuple(call.args), dict(call.kwargs), strict=False)
        pairs = [(o, g) for o, g in zip(tensors_in(out), call.grads) if g is not None]
        total = sum((o * g).sum() for o, g in pairs)
        got = torch.autograd.grad(total, list(chosen.values()), allow_unused=True)
    return {n: torch.zeros_like(chosen[n]) if g is None else g for n, g in zip(names, got)}


def own_parameter_names(module):
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def generic_rule(module, call):
    """The sample-VJP rule for a module without a registered rule, checked against the batch gradient."""
    names = own_parameter_names(module)
    reason = stochastic_reason(module)
    if reason:
        raise ValueError(_no_rule_message(module, f"re-running it per sample would not reproduce the forward: {reason}"))
    try:
        per_sample = sample_vjp_gradients(module, call, names)
    except Exception as exc:
        raise ValueError(_no_rule_message(module, f"re-running it per sample failed ({type(exc).__name__}: {exc})")) from exc
    batch = batch_vjp_gradients(module, call, names)
    for n in names:
        total, ref = per_sample[n].sum(0), batch[n]
        tol = 1e-6 if ref.dtype == torch.float64 else 1e-3
        if float((total - ref).norm()) > tol * (float(ref.norm()) + float(per_sample[n].norm()) / max(call.batch_size or 1, 1) + 1e-30):
            raise ValueError(_no_rule_message(module, f"its per-sample gradients of {n!r} do not sum to the batch gradient "
                                                      "(it mixes the samples, or its batch is not dimension 0)"))
    return per_sample


def _no_rule_message(module, why):
    return (f"PerSampleGradients: no rule for {type(module).__name__} and the per-sample vector-Jacobian rule does not "
            f"apply: {why}. Register one with lk.register_per_sample_rule({type(module).__name__}, rule) "
            "(docs/guide/per-sample.md), leave its parameters out (layers=[...] or requires_grad=False), or use "
            "fallback='vmap' with compute(loss_fn, inputs, targets)")


def multihead_attention_rule(module, call):
    """``nn.MultiheadAttention``: its projections are used through the functional path, so the module's
    per-sample VJP covers all of its parameters (``out_proj``'s included)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    seq_dim = 0 if module.batch_first else 1
    if call.input.dim() != 3:
        raise ValueError(f"PerSampleGradients: MultiheadAttention needs batched inputs, got shape {tuple(call.input.shape)}")
    mask = call.kwargs.get("attn_mask", call.args[5] if len(call.args) > 5 else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        raise ValueError("PerSampleGradients: MultiheadAttention with a per-sample (B * heads, L, S) attn_mask is not "
                         "supported; pass a (L, S) mask with a (B, S) key_padding_mask")
    dims = {0: seq_dim, 1: seq_dim, 2: seq_dim, 3: 0}  # query, key, value, key_padding_mask
    arg_dims = tuple(dims.get(i) if isinstance(a, torch.Tensor) else None for i, a in enumerate(call.args))
    kwarg_dims = {k: (0 if k == "key_padding_mask" and isinstance(v, torch.Tensor) else
                      seq_dim if k in ("query", "key", "value") else None) for k, v in call.kwargs.items()}
    out_dims = (seq_dim, 0)  # the attention output, the attention weights
    return sample_vjp_gradients(module, call, names, arg_dims, kwarg_dims, out_dims[: len(call.grads)])


def multihead_attention_check(module):
    return stochastic_reason(module)


register_per_sample_rule(nn.MultiheadAttention, multihead_attention_rule, check=multihead_attention_check,
                         covers_children=True)
