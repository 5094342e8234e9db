"""Whole-model per-sample gradients for the parameters no rule serves (``PerSampleGradients(...,
fallback="vmap")``): ``torch.func`` ``vmap`` of ``grad``, each sample passed as a batch of one, in chunks;
tied weights and buffers are kept (``functional_call`` ties them). A model ``vmap`` cannot run
(data-dependent control flow, e.g. the attention masks some transformers models build) gets one ordinary
backward per sample instead."""
import torch
from torch.func import grad, vmap

from .model import batch_size_of, call_model, model_output, slice_batch


def whole_model_per_sample_gradients(model, loss_fn, inputs, targets, params, output_fn=None, chunk_size=64):
    """(B, sum of sizes) per-sample gradients of ``loss_fn(output_fn(model(x_b)), y_b)`` in ``params``
    (name -> parameter, flattened in that order)."""
    names = list(params)
    B = batch_size_of(inputs)
    trainable = {n: params[n].detach() for n in names}
    rows = []
    for start in range(0, B, chunk_size):
        x = slice_batch(inputs, start, start + chunk_size)
        y = targets[start : start + batch_size_of(x)]
        dims = _input_dims(x, batch_size_of(x))

        def sample_loss(values, x_b, y_b, dims=dims):
            out = model_output(call_model(model, _with_batch_of_one(x_b, dims), values), output_fn)
            return loss_fn(out, y_b.unsqueeze(0))

        try:
            with torch.no_grad():  # the other parameters are constants here (grad transforms see through it)
                g = vmap(grad(sample_loss), in_dims=(None, dims, 0))(trainable, x, y)
            rows.append(torch.cat([g[k].flatten(1) for k in names], 1))
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
            rows.append(looped_per_sample_gradients(model, loss_fn, x, y, params, output_fn))
    return torch.cat(rows)


def looped_per_sample_gradients(model, loss_fn, inputs, targets, params, output_fn=None):
    """The same by one forward and backward per sample."""
    names = list(params)
    rows = []
    for b in range(batch_size_of(inputs)):
        out = model_output(call_model(model, slice_batch(inputs, b, b + 1)), output_fn)
        g = torch.autograd.grad(loss_fn(out, targets[b : b + 1]), [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([torch.zeros_like(params[n]).flatten() if gi is None else gi.flatten()
                               for n, gi in zip(names, g)]))
    return torch.stack(rows)


def _input_dims(inputs, B):
    """vmap in_dims for model inputs: 0 for tensors with the batch size leading, None for the others."""
    def dim(v):
        return 0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else None

    if isinstance(inputs, torch.Tensor):
        return 0
    if isinstance(inputs, dict):
        return {k: dim(v) for k, v in inputs.items()}
    return type(inputs)(dim(v) for v in inputs)


def _with_batch_of_one(inputs, dims):
    """Inside vmap: each sample's inputs as a batch of one (the tensors ``dims`` marks as batched)."""
    def widen(v, d):
        return v.unsqueeze(0) if d == 0 else v

    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    if isinstance(inputs, dict):
        return {k: widen(v, dims[k]) for k, v in inputs.items()}
    return type(inputs)(widen(v, d) for v, d in zip(inputs, dims))
