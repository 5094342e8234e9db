"""Per-sample first and second derivatives of the loss along directions of one parameter.

For every sample p and direction v_k: d1[p, k] = d/dt l_p(theta + t v_k) and d2[p, k] = d^2/dt^2 of the
same at t = 0, by forward-mode differentiation (``torch.func.jvp`` of ``jvp``), vmapped over chunks of
directions. Minibatch derivatives are means of these over the batch, so the statistics of Feng & Tu 2021
(MLF minima and curvatures) and §1.6 (active temperature) need no further passes. When the parameter
belongs to a layer of an ``nn.Sequential``, the layers before it run once, not once per direction.
"""
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from ..capture.model import chosen_parameters, eval_mode
from ..kernels.checks import all_finite


def _split_at(model, name):
    """(prefix, module, local parameter name, suffix) when ``name`` is a parameter of a top-level layer
    of an nn.Sequential, else None."""
    index, _, leaf = name.partition(".")
    if not isinstance(model, nn.Sequential) or not index.isdigit() or "." in leaf:
        return None
    i = int(index)
    return model[:i], model[i], leaf, model[i + 1 :]


def per_sample_directional_derivatives(model, loss_fn, x, y, param, directions, order=2, chunk=4096,
                                       direction_chunk=16):
    """(d1, d2) of shape (N, K) (d2 None when ``order`` is 1), float64 on the CPU.

    Args:
        model, loss_fn: ``loss_fn(outputs, targets)`` is the mean loss over a batch.
        x, y: the samples.
        param: the parameter name (e.g. "2.weight"); the others stay fixed.
        directions: (K, *param.shape) or (K, param.numel()).
        chunk, direction_chunk: samples and directions per vmapped call (memory).
    """
    if order not in (1, 2):
        raise ValueError(f"per_sample_directional_derivatives: order must be 1 or 2, got {order!r}")
    (name,), (theta,) = chosen_parameters(model, [param])
    theta = theta.detach()
    if not isinstance(directions, torch.Tensor) or directions.dim() < 1 or directions[0].numel() != theta.numel():
        raise ValueError(f"per_sample_directional_derivatives: directions must have shape (K, {tuple(theta.shape)}) "
                         f"or (K, {theta.numel()}), got {getattr(directions, 'shape', type(directions))}")
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"per_sample_directional_derivatives: x and y must hold the same positive number of samples, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    if not all_finite(directions):
        raise ValueError("per_sample_directional_derivatives: directions contain NaN/Inf")
    V = directions.reshape(-1, *theta.shape).to(theta.device, theta.dtype)
    split = _split_at(model, name)
    with eval_mode(model):
        d1, d2 = [], []
        for s in range(0, x.shape[0], chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            if split is not None:
                prefix, module, leaf, suffix = split
                with torch.no_grad():
                    inputs = prefix(xs)

                def losses(w, inputs=inputs, ys=ys, module=module, leaf=leaf, suffix=suffix):
                    return _per_sample(loss_fn, suffix(functional_call(module, {leaf: w}, (inputs,), strict=False)), ys)
            else:
                def losses(w, xs=xs, ys=ys):
                    return _per_sample(loss_fn, functional_call(model, {name: w}, (xs,), strict=False), ys)

            def first(v, losses=losses):
                return jvp(losses, (theta,), (v,))[1]

            def both(v, losses=losses):
                return jvp(lambda w: jvp(losses, (w,), (v,))[1], (theta,), (v,))

            parts1, parts2 = [], []
            for c in range(0, V.shape[0], direction_chunk):
                Vc = V[c : c + direction_chunk]
                if order == 1:
                    parts1.append(vmap(first)(Vc))
                else:
                    a, b = vmap(both)(Vc)
                    parts1.append(a)
                    parts2.append(b)
            d1.append(torch.cat(parts1).T.detach().double().cpu())
            if order == 2:
                d2.append(torch.cat(parts2).T.detach().double().cpu())
    return torch.cat(d1), (torch.cat(d2) if order == 2 else None)


def _per_sample(loss_fn, outputs, targets):
    return vmap(lambda o, t: loss_fn(o[None], t[None]))(outputs, targets)
