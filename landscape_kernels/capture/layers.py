"""The built-in per-sample gradient rules (see ``capture.rules`` for what a rule returns).

Factor rules, G_b = sum_t D[b, t]^T A[b, t], consumed by the fused kernels:

- ``nn.Linear`` (inputs of any rank >= 2, batch first; a 2-D input of k B rows is read as k rows per
  sample, see ``sample_rows``): A is the input, D the output gradient, positions flattened;
  transformers' ``Conv1D`` (GPT-2's projections, weight stored (in, out)) the same with the roles swapped;
- ``nn.Conv1d/2d/3d`` (any stride, dilation, padding and padding mode): A holds the input patches, D the
  output gradient per output position; with ``groups > 1`` (depthwise included) the per-sample weight
  gradients are formed explicitly, one small (B, out, in / groups, *kernel) tensor;
- ``nn.Embedding``: the roles swap, A is the output gradient and D the one-hot indices, so that
  sum_t D^T A has the weight's (vocabulary, dim) shape (the padding row receives nothing); indices shared
  by the batch (position ids of shape (T,) or (1, T)) are broadcast over it (``PerSampleGradients``
  widens such an output to the batch so that its gradient keeps the samples apart).

Explicit rules for the normalisation layers, whose weights are vectors: ``nn.LayerNorm``,
``nn.RMSNorm``, ``nn.GroupNorm``, BatchNorm in eval mode (running statistics) and the RMS norms of
transformers models (classes named ``*RMSNorm``, T5's ``T5LayerNorm``): the weight's gradient is the sum
over positions of D * x_hat, the bias's the sum of D. Every other module with parameters
(``nn.MultiheadAttention``, a module owning a bare ``nn.Parameter``) gets the exact per-sample
vector-Jacobian rule of ``capture.sample_vjp``.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from .rules import Factors, register_per_sample_rule
from .sample_vjp import generic_rule


def sample_rows(t, batch_size):
    """``t`` as (B, rows per sample, ...): a 2-D (k B, features) input of a layer is read as the k rows of
    each sample in order (the ``reshape(-1, d)`` of a (B, T, d) tensor, as OPT's MLP does); other inputs
    keep their leading batch dimension."""
    if t.dim() == 2 and batch_size and t.shape[0] != batch_size and t.shape[0] % batch_size == 0:
        return t.reshape(batch_size, -1, t.shape[-1])
    return t


def _batched_2d(call, name, x, grad, width):
    if x.dim() < 2:
        raise ValueError(f"PerSampleGradients: layer {name!r} got an unbatched input of shape {tuple(x.shape)}")
    x, grad = sample_rows(x, call.batch_size), sample_rows(grad, call.batch_size)
    B = x.shape[0]
    return x.reshape(B, -1, x.shape[-1]), grad.reshape(B, -1, width)


def _bias(D):
    """A bias is a weight on a constant input 1: sum_t D[b, t]^T 1, one position."""
    return Factors(D.new_ones(D.shape[0], 1, 1), D.sum(1, keepdim=True) if D.shape[1] > 1 else D)


def linear_rule(module, call):
    A, D = _batched_2d(call, type(module).__name__, call.input, call.grad, module.out_features)
    return {"weight": Factors(A, D), "bias": _bias(D)}


def transformers_conv1d_rule(module, call):
    """transformers' ``Conv1D``: y = x W + b with W of shape (in, out)."""
    x, grad = call.input, call.grad
    A, D = _batched_2d(call, "Conv1D", x, grad, grad.shape[-1])
    return {"weight": Factors(D, A), "bias": _bias(D)}


def conv_patches(module, x):
    """(B, T, groups, in / groups * prod(kernel)) input patches of a ConvNd, in the weight's layout,
    T the output positions, after the module's own padding (any padding mode)."""
    nd = len(module.kernel_size)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for i, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window dimension
        if d > 1:
            x = x[..., ::d]
    B, C = x.shape[:2]
    spatial = x.shape[2 : 2 + nd]
    T = int(torch.Size(spatial).numel())
    # (B, C, *out positions, *kernel) -> (B, *out positions, C, *kernel)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    g = module.groups
    return x.reshape(B, T, g, (C // g) * int(torch.Size(module.kernel_size).numel()))


def conv_rule(module, call):
    x, grad = call.input, call.grad
    nd = len(module.kernel_size)
    if x.dim() != nd + 2:
        raise ValueError(f"PerSampleGradients: {type(module).__name__} needs a batched (B, C, {nd} spatial) input, "
                         f"got shape {tuple(x.shape)}")
    patches = conv_patches(module, x)
    B, T, g, _ = patches.shape
    D = grad.reshape(B, module.out_channels, T).transpose(1, 2)  # (B, T, out)
    if g == 1:
        weight = Factors(patches[:, :, 0], D)
    else:  # block-diagonal over the groups: small explicit per-sample gradients
        Dg = D.reshape(B, T, g, module.out_channels // g)
        weight = torch.einsum("btgi,btgo->bgoi", patches, Dg).reshape(B, *module.weight.shape)
    return {"weight": weight, "bias": _bias(D)}


def embedding_rule(module, call):
    idx, grad = call.input, call.grad
    if grad.dim() < 2:
        raise ValueError(f"PerSampleGradients: Embedding got unbatched indices of shape {tuple(idx.shape)} outside the "
                         "model's forward; give it batched indices, e.g. positions.expand(B, T)")
    if tuple(idx.shape) != tuple(grad.shape[:-1]):  # indices shared by the batch, broadcast over it
        idx = idx.expand(grad.shape[:-1])
    B = grad.shape[0]
    onehot = F.one_hot(idx.reshape(B, -1), module.num_embeddings).to(grad.dtype)
    if module.padding_idx is not None:  # the padding row receives no gradient
        onehot[..., module.padding_idx] = 0
    return {"weight": Factors(grad.reshape(B, -1, grad.shape[-1]), onehot)}


def widen_shared_embedding(indices, output, B):
    """An embedding of indices shared by the batch (position ids of shape (1, T), or (T,) with T != B) as
    a (B, ...) view, so that its gradient keeps the samples apart; None when the indices are batched."""
    if not isinstance(indices, torch.Tensor) or B is None:
        return None
    if indices.dim() >= 2 and indices.shape[0] == 1 and B > 1:
        return output.expand(B, *output.shape[1:])
    if indices.dim() == 1 and indices.shape[0] != B:
        return output.unsqueeze(0).expand(B, *output.shape)
    return None


def embedding_check(module):
    if module.max_norm is not None or module.scale_grad_by_freq:
        return "Embedding with max_norm or scale_grad_by_freq"
    return None


def affine_gradients(module, grad, x_hat, channel_dim=None):
    """{weight: sum over positions of grad * x_hat, bias: sum of grad}, each (B, *parameter shape), for
    a parameter over the trailing dims (``channel_dim`` None) or over dim ``channel_dim``."""
    if channel_dim is not None:
        grad, x_hat = grad.movedim(channel_dim, -1), x_hat.movedim(channel_dim, -1)
    B = grad.shape[0]
    shape = (module.weight if module.weight is not None else module.bias).shape
    size = int(torch.Size(shape).numel())
    out = {}
    if module.weight is not None:
        out["weight"] = (grad * x_hat).reshape(B, -1, size).sum(1).reshape(B, *shape)
    if getattr(module, "bias", None) is not None:
        out["bias"] = grad.reshape(B, -1, size).sum(1).reshape(B, *shape)
    return out


def layer_norm_rule(module, call):
    x_hat = F.layer_norm(call.input, module.normalized_shape, None, None, module.eps)
    return affine_gradients(module, sample_rows(call.grad, call.batch_size), sample_rows(x_hat, call.batch_size))


def rms_norm_rule(module, call):
    x_hat = F.rms_norm(call.input, module.normalized_shape, None, module.eps)
    return affine_gradients(module, sample_rows(call.grad, call.batch_size), sample_rows(x_hat, call.batch_size))


def scaled_norm_rule(module, call):
    """The RMS norms of transformers models (Llama, Mistral, Qwen, Gemma, T5: a weight times, or one plus
    the weight times, the normalised input, which they may compute in float32): the weight's per-sample
    gradient is sum_t D * x_hat with x_hat = d output / d weight in the direction of ones, taken on the
    recorded batch (the model's own rounding). Modules of such a name with another shape of parameters
    get the checked per-sample VJP rule."""
    own = dict(module.named_parameters(recurse=False))
    x = call.input
    if list(own) != ["weight"] or own["weight"].dim() != 1 or x.shape[-1] != own["weight"].shape[0] or call.kwargs \
            or len(call.args) != 1:
        return generic_rule(module, call)
    weight = own["weight"].detach()
    _, x_hat = jvp(lambda w: functional_call(module, {"weight": w}, (x,)), (weight,), (torch.ones_like(weight),))
    grad = sample_rows(call.grad, call.batch_size)
    x_hat = sample_rows(x_hat.to(grad.dtype), call.batch_size)
    B = grad.shape[0]
    return {"weight": (grad * x_hat).reshape(B, -1, weight.shape[0]).sum(1)}


def group_norm_rule(module, call):
    x_hat = F.group_norm(call.input, module.num_groups, None, None, module.eps)
    return affine_gradients(module, call.grad, x_hat, channel_dim=1)


def batch_norm_rule(module, call):
    x = call.input
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
    return affine_gradients(module, call.grad, x_hat, channel_dim=1)


def batch_norm_check(module):
    if module.training or module.running_mean is None:
        return ("BatchNorm normalising with batch statistics (training mode, or track_running_stats=False) mixes the "
                "samples of a batch, so per-sample gradients are not defined; call model.eval() with running statistics")
    return None


register_per_sample_rule(nn.Linear, linear_rule)
register_per_sample_rule("transformers.pytorch_utils.Conv1D", transformers_conv1d_rule)
for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # each defines its own forward (a subclass rule needs the same)
    register_per_sample_rule(conv, conv_rule)
register_per_sample_rule(nn.Embedding, embedding_rule, check=embedding_check, widen_shared=True)
register_per_sample_rule(nn.LayerNorm, layer_norm_rule)
register_per_sample_rule(nn.RMSNorm, rms_norm_rule)
register_per_sample_rule(nn.GroupNorm, group_norm_rule)
register_per_sample_rule("*RMSNorm", scaled_norm_rule)
register_per_sample_rule("*T5LayerNorm", scaled_norm_rule)
register_per_sample_rule(nn.modules.batchnorm._BatchNorm, batch_norm_rule, check=batch_norm_check)
