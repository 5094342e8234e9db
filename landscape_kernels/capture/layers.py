"""The per-layer rules of per-sample gradient capture.

For a hooked layer, one forward call records its input x and the gradient of the loss with respect to
its output; a rule turns them into the factors of the per-sample weight gradients,
G_b = sum_t D[b, t]^T A[b, t] with A of shape (B, T, in) and D of shape (B, T, out), which the fused
kernels consume without ever forming the B x out x in tensor:

- ``nn.Linear`` (inputs of any rank >= 2): A is the input, D the output gradient, positions flattened;
- ``nn.Conv2d``: A holds the input patches (``unfold``), D the output gradient per output pixel;
- ``nn.Embedding``: the roles swap, A is the output gradient and D the one-hot indices, so that
  sum_t D^T A has the weight's (vocabulary, dim) shape (the padding row receives nothing).

``nn.LayerNorm`` has no such factorisation worth using (its weight is a vector): its per-sample
gradients are formed explicitly by ``layer_norm_gradients``.
"""
import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)


def unsupported_reason(module):
    """Why ``module``'s parameters have no per-sample rule (None when they have one)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "Conv2d with groups > 1"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        return None
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return "Embedding with max_norm or scale_grad_by_freq"
    if isinstance(module, SUPPORTED_MODULES):
        return None
    return type(module).__name__


def has_explicit_gradients(module):
    """Whether the layer's per-sample gradients are formed explicitly rather than as (A, D) factors."""
    return isinstance(module, nn.LayerNorm)


def call_factors(name, module, x, grad):
    """(A (B, T, in), D (B, T, out)) of one call of the layer ``name`` with input ``x`` and output
    gradient ``grad``."""
    if isinstance(module, nn.Embedding):
        return _embedding_factors(name, module, x, grad)
    if isinstance(module, nn.Linear):
        if x.dim() < 2:
            raise ValueError(f"PerSampleGradients: layer {name!r} got an unbatched input of shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1, x.shape[-1]), grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return _conv2d_factors(name, module, x, grad)


def _embedding_factors(name, module, x, grad):
    if x.dim() < 2:  # e.g. positions arange(T) broadcast over the batch: the per-sample parts are summed away
        raise ValueError(f"PerSampleGradients: Embedding {name!r} got unbatched indices of shape {tuple(x.shape)} "
                         "(shared by every sample); give it batched indices, e.g. positions.expand(B, T)")
    B = x.shape[0]
    onehot = F.one_hot(x.reshape(B, -1), module.num_embeddings).to(grad.dtype)
    if module.padding_idx is not None:  # the padding row receives no gradient
        onehot[..., module.padding_idx] = 0
    return grad.reshape(B, -1, grad.shape[-1]), onehot


def _conv2d_factors(name, module, x, grad):
    if x.dim() != 4:
        raise ValueError(
            f"PerSampleGradients: Conv2d layer {name!r} needs a batched (B, C, H, W) input, got shape {tuple(x.shape)}"
        )
    padding = module.padding
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1); pad explicitly, possibly unevenly
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), 0
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2), grad.flatten(2).transpose(1, 2)


def layer_norm_gradients(module, inputs, grads):
    """(G_weight, G_bias), each (B, normalized size): LayerNorm's per-sample gradients summed over
    positions and calls, sum of D * x_hat (weight) and of D (bias), for the recorded ``inputs`` and
    output ``grads`` of each call."""
    size = int(torch.Size(module.normalized_shape).numel())
    G_w = G_b = 0
    for x, grad in zip(inputs, grads):
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        G_w = G_w + (grad * x_hat).reshape(x.shape[0], -1, size).sum(1)
        G_b = G_b + grad.reshape(x.shape[0], -1, size).sum(1)
    return G_w, G_b
