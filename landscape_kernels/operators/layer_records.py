"""One forward of a model with its linear layers recorded, then the backward of many output directions
at once: what KFAC's factors and the exact GGN diagonal are built from.

``factor_layers`` groups chosen parameters by the layers whose weight gradient is a sum over positions
of (output gradient)^T (input): ``nn.Linear`` (inputs of any rank), ``nn.Conv1d/2d/3d`` with
``groups=1`` (input patches) and transformers' ``Conv1D``. ``LayerRecording`` hooks them for one
forward and gives each layer's input rows (B, T, in) and, for a set of output directions s_k, the
gradient of <output, s_k> at each layer's output as rows (B, T, out): the backward passes run batched
over the directions (``is_grads_batched``), one by one where an operation has no batching rule.
"""
import torch
from torch import nn

from ..capture.layers import conv_patches, sample_rows
from ..kernels import ops

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transformers_conv1d(module):
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def uncovered_reason(module):
    """None when the layer's weight and bias are factor layers here, else why not."""
    if isinstance(module, CONV_LAYERS):
        return None if module.groups == 1 else f"{type(module).__name__} with groups={module.groups}"
    if isinstance(module, nn.Linear) or is_transformers_conv1d(module):
        return None
    return type(module).__name__


def factor_layers(model, names):
    """({layer name: (module, {"weight"/"bias": parameter name})}, [names of other parameters, with why])
    for the parameter ``names`` of ``model``."""
    modules = dict(model.named_modules())
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    layers, others = {}, []
    for name in names:
        owner, _, rel = name.rpartition(".")
        module = modules.get(owner)
        reason = "a parameter outside weight/bias" if module is None or rel not in ("weight", "bias") \
            else uncovered_reason(module)
        if reason is None and name in named and uses.get(id(named[name]), 1) > 1:
            reason = "shared with another module"
        if reason is None:
            layers.setdefault(owner, (module, {}))[1][rel] = name
        else:
            others.append((name, reason))
    return layers, others


def _rows(module, t, B, outputs):
    """A layer's input (``outputs`` False) or output gradient as (B, T, features) rows."""
    if isinstance(module, CONV_LAYERS):
        if outputs:
            return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)
        return conv_patches(module, t)[:, :, 0]
    t = sample_rows(t, B)
    return t.reshape(t.shape[0], -1, t.shape[-1])


class LayerRecording:
    """``with LayerRecording(layers, B) as rec: output = model(x)`` records the input rows and the
    output tensors of every call of each layer (``layers``: name -> module); ``input_rows()`` and
    ``gradient_rows(output, columns)`` then give the rows, the positions of a layer's calls joined."""

    def __init__(self, layers, batch_size):
        self.layers, self.B = layers, batch_size
        self.calls = {name: [] for name in layers}
        self._handles = []

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _hook(self, name):
        def hook(module, args, output):
            self.calls[name].append((_rows(module, args[0].detach(), self.B, False), output))
        return hook

    def check_ran(self, owner):
        missing = [n for n, calls in self.calls.items() if not calls]
        if missing:
            raise RuntimeError(f"{owner}: the layers {missing} did not run in the model's forward")

    def input_rows(self):
        return {n: torch.cat([a for a, _ in calls], 1) for n, calls in self.calls.items()}

    def gradient_rows(self, output, columns, chunk=32):
        """For each column s_k (shaped like ``output``), {layer: rows (B, T, out)} of the gradient of
        <output, s_k> at the layer's outputs; ``chunk`` columns per batched backward. The graph is freed
        when the caller lets go of ``output``."""
        outs = [(n, o) for n, calls in self.calls.items() for _, o in calls]
        tensors = [o for _, o in outs]
        columns = list(columns)
        for start in range(0, len(columns), chunk):
            part = torch.stack([c.to(output.dtype) for c in columns[start:start + chunk]])
            for grads in self._backward(output, tensors, part):
                rows = {}
                for (name, o), g in zip(outs, grads):
                    g = torch.zeros_like(o) if g is None else g
                    rows.setdefault(name, []).append(_rows(self.layers[name], g.detach(), self.B, True))
                yield {n: torch.cat(parts, 1) for n, parts in rows.items()}

    @staticmethod
    def _backward(output, tensors, columns):
        """[grads per column] for the (K, *output) columns: one batched backward, or K plain ones where
        an operation of the graph has no batching rule."""
        try:
            batched = torch.autograd.grad(output, tensors, grad_outputs=columns, retain_graph=True,
                                          allow_unused=True, is_grads_batched=True)
            per_column = [[None if g is None else g[k] for g in batched] for k in range(columns.shape[0])]
        except (RuntimeError, NotImplementedError):
            per_column = [torch.autograd.grad(output, tensors, grad_outputs=c, retain_graph=True, allow_unused=True)
                          for c in columns]
        return per_column


class SquaredGradientSums:
    """The sum over columns k and samples n of the squared per-sample gradients of one layer's weight,
    G_nk = sum_t d_k[n, t]^T a[n, t] ((out, in); ``transposed``: a^T d_k, (in, out), a weight stored
    (in, out)), and of its bias, sum_t d_k[n, t], for input rows ``a`` (B, T, in; None for a bias alone)
    and the output-gradient rows d_k (B, T, out) given column by column to ``add``.

    With one position per sample sum_n (d_n a_n^T)^2 = (d^2)^T (a^2): the squared gradients of every
    column are summed first and meet the squared inputs in one product. With several, up to ``stack``
    columns are joined along the output features into one call of the fused moment kernel."""

    def __init__(self, a, transposed=False, stack=16):
        self.a, self.transposed, self.stack = a, transposed, stack
        self.single = a is not None and a.shape[1] == 1
        self._weight, self._bias, self._square, self._pending = 0.0, 0.0, 0.0, []

    def add(self, d):
        self._bias = self._bias + d.sum(1).pow(2).sum(0)
        if self.a is None:
            return
        if self.single:
            self._square = self._square + d[:, 0] ** 2
            return
        self._pending.append(d)
        if len(self._pending) == self.stack:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        K, B, a = len(self._pending), self.a.shape[0], self.a.contiguous()
        d = torch.cat(self._pending, -1).contiguous()  # (B, T, K out)
        if self.transposed:
            mean, var = ops.per_sample_moments(d, a)  # (in, K out)
            part = ((var + mean ** 2) * B).reshape(a.shape[-1], K, -1).sum(1)
        else:
            mean, var = ops.per_sample_moments(a, d)  # (K out, in)
            part = ((var + mean ** 2) * B).reshape(K, -1, a.shape[-1]).sum(0)
        self._weight = self._weight + part
        self._pending = []

    def weight(self):
        if self.single:
            d2, a2 = self._square, self.a[:, 0] ** 2
            return a2.T @ d2 if self.transposed else d2.T @ a2
        self._flush()
        return self._weight

    def bias(self):
        return self._bias
