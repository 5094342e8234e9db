"""Exact Hessian-vector products of an ``nn.Sequential`` MLP by the R-operator (Pearlmutter 1994).

For a network of Linear layers and elementwise activations under cross-entropy or mean-squared error,
the product H V for K columns is one forward pass of the directional derivatives R(z) = dz/dtheta . v
followed by one backward pass of R(delta), with every column stacked into the same GEMM: the layer
input times all K weight directions is one (B, in) x (in, K * out) product, the weight-gradient
directions one (K * out, B) x (B, in) product. No autograd graph is built; the activations, the
first-order backward errors and the activation derivatives of a batch are all a product needs, so
they can be kept across products (``prepare`` once, ``products`` many times).

Conventions: activations of a batch are (B, features); R-quantities of K columns are (B, K, features).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _relu(z):
    return torch.relu(z), (z > 0).to(z.dtype), None


def _leaky_relu(slope):
    def derivs(z):
        return F.leaky_relu(z, slope), (z > 0).to(z.dtype) * (1 - slope) + slope, None

    return derivs


def _tanh(z):
    a = torch.tanh(z)
    d1 = 1 - a * a
    return a, d1, -2 * a * d1


def _sigmoid(z):
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _activation(module):
    """(output, first derivative, second derivative or None where it vanishes) as a function of z."""
    if type(module) is nn.ReLU:
        return _relu
    if type(module) is nn.LeakyReLU:
        return _leaky_relu(module.negative_slope)
    if type(module) is nn.Tanh:
        return _tanh
    if type(module) is nn.Sigmoid:
        return _sigmoid
    return None


def _passes_through(module):
    """Modules that are the identity on a (B, features) batch in eval mode."""
    if type(module) in (nn.Identity, nn.Dropout):
        return True
    return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1


def loss_kind(loss_fn):
    """"ce" (mean cross-entropy on class indices), "mse" (mean squared error) or None."""
    if loss_fn is F.cross_entropy:
        return "ce"
    if loss_fn is F.mse_loss:
        return "mse"
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None \
            and loss_fn.label_smoothing == 0:
        return "ce"
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean":
        return "mse"
    return None


def unsupported_reason(model, loss_fn, param_names, inputs, targets):
    """Why the R-operator path cannot serve this model, loss and data (None when it can)."""
    if not isinstance(model, nn.Sequential):
        return "the model is not an nn.Sequential"
    for i, m in enumerate(model):
        if not (type(m) is nn.Linear or _activation(m) or _passes_through(m)):
            return f"layer {i} ({type(m).__name__}) is not a Linear, an elementwise activation or a pass-through"
    for name in param_names:
        index, _, leaf = name.partition(".")
        if not index.isdigit() or type(model[int(index)]) is not nn.Linear or leaf not in ("weight", "bias"):
            return f"parameter {name!r} is not the weight or bias of a Linear layer"
    first_linear = next(i for i, m in enumerate(model) if type(m) is nn.Linear)
    flattened = any(type(m) is nn.Flatten for m in model[:first_linear])
    if inputs.dim() != 2 and not flattened:
        return f"inputs of shape {tuple(inputs.shape)} reach a Linear layer with more than two dimensions"
    kind = loss_kind(loss_fn)
    if kind is None:
        return "the loss is neither mean cross-entropy nor mean squared error"
    if kind == "ce" and (targets.dtype != torch.long or targets.dim() != 1 or bool((targets < 0).any())):
        return "cross-entropy targets are not non-negative class indices of shape (B,)"
    last = [m for m in model if type(m) is nn.Linear][-1]
    if kind == "mse" and tuple(targets.shape) != (inputs.shape[0], last.out_features):
        return f"mse targets of shape {tuple(targets.shape)} differ from the output's (B, {last.out_features})"
    return None


@dataclass
class BatchState:
    """What the products of one batch need: per module its input (Linear) or derivatives (activation)
    or input shape (Flatten), the first-order gradient of the loss w.r.t. each module's output, and
    the softmax (cross-entropy) at the output."""

    records: list
    deltas: list
    softmax: torch.Tensor = None
    rows: int = 0
    scale: float = 1.0  # d loss / d output = scale * (softmax - onehot) or scale * (output - target)


class MLPHessianProducts:
    """Hessian-vector products of ``weight * loss_fn(model(x), y)`` for the chosen Linear parameters."""

    def __init__(self, model, loss_fn, param_names):
        self.model = model
        self.kind = loss_kind(loss_fn)
        self.chosen = {}  # layer index -> {"weight": position in param_names, "bias": ...}
        for pos, name in enumerate(param_names):
            index, _, leaf = name.partition(".")
            self.chosen.setdefault(int(index), {})[leaf] = pos
        self.first_chosen = min(self.chosen)

    @torch.no_grad()
    def prepare(self, x, y, weight):
        records, h = [], x
        for m in self.model:
            if type(m) is nn.Linear:
                records.append(h)
                h = F.linear(h, m.weight, m.bias)
            elif _activation(m):
                h, d1, d2 = _activation(m)(h)
                records.append((d1, d2))
            elif type(m) is nn.Flatten:
                records.append(h.shape)
                h = h.flatten(1)
            else:
                records.append(None)
        B = h.shape[0]
        state = BatchState(records, [None] * len(records), rows=B)
        if self.kind == "ce":
            state.softmax = torch.softmax(h, dim=1)
            state.scale = weight / B
            d = state.softmax.clone()
            d[torch.arange(B, device=h.device), y] -= 1
        else:
            if y.shape != h.shape:
                raise ValueError(f"HessianOperator: mse targets must have the output's shape {tuple(h.shape)}, got {tuple(y.shape)}")
            state.scale = 2 * weight / h.numel()
            d = h - y
        d = d * state.scale
        for i in range(len(self.model) - 1, self.first_chosen - 1, -1):  # first-order backward
            state.deltas[i] = d
            m, rec = self.model[i], records[i]
            if i == self.first_chosen:
                break
            if type(m) is nn.Linear:
                d = d @ m.weight
            elif _activation(m):
                d = d * rec[0]
            elif type(m) is nn.Flatten:
                d = d.reshape(rec)
        return state

    @torch.no_grad()
    def products(self, state, vs):
        """H V for the chosen parameters: ``vs`` lists (K, *shape) per chosen parameter (in the order of
        ``param_names``); returns the same layout."""
        K, B = vs[0].shape[0], state.rows
        out = [None] * len(vs)
        r_in, r_pre = {}, {}  # R of each Linear's input; R of each activation's input
        Rh = None  # R of the current activations, (B, K, features); None while it is zero
        for i, m in enumerate(self.model):
            rec = state.records[i]
            if type(m) is nn.Linear:
                r_in[i] = Rh
                Rz = None if Rh is None else Rh @ m.weight.T
                pos = self.chosen.get(i, {})
                if "weight" in pos:
                    VW = vs[pos["weight"]]  # (K, out, in)
                    t = (rec @ VW.reshape(K * m.out_features, -1).T).view(B, K, m.out_features)
                    Rz = t if Rz is None else Rz.add_(t)
                if "bias" in pos:
                    Vb = vs[pos["bias"]]  # (K, out)
                    Rz = Vb.expand(B, K, m.out_features).clone() if Rz is None else Rz.add_(Vb)
                Rh = Rz
            elif _activation(m):
                r_pre[i] = Rh
                Rh = None if Rh is None else Rh * rec[0][:, None]
            elif type(m) is nn.Flatten and Rh is not None:
                Rh = Rh.flatten(2)
        if self.kind == "ce":  # R(delta) = scale * (diag(s) - s s^T) R(z)
            s = state.softmax[:, None, :]
            sRz = s * Rh
            Rd = (sRz - s * sRz.sum(2, keepdim=True)) * state.scale
        else:
            Rd = Rh * state.scale
        for i in range(len(self.model) - 1, self.first_chosen - 1, -1):
            m, rec = self.model[i], state.records[i]
            if type(m) is nn.Linear:
                delta, Ra, pos = state.deltas[i], r_in[i], self.chosen.get(i, {})
                if "weight" in pos:
                    g = (Rd.reshape(B, -1).T @ rec).view(K, m.out_features, m.in_features)
                    if Ra is not None:  # delta^T R(a): (out, K * in)
                        g += (delta.T @ Ra.reshape(B, -1)).view(m.out_features, K, m.in_features).transpose(0, 1)
                    out[pos["weight"]] = g
                if "bias" in pos:
                    out[pos["bias"]] = Rd.sum(0)
                if i == self.first_chosen:
                    break
                new = Rd @ m.weight
                if "weight" in pos:  # + delta V_W, the weight direction acting on the backward error
                    VW = vs[pos["weight"]]
                    new += (delta @ VW.transpose(0, 1).reshape(m.out_features, -1)).view(B, K, m.in_features)
                Rd = new
            elif _activation(m):
                d1, d2 = rec
                Rd = Rd * d1[:, None]
                if d2 is not None and r_pre[i] is not None:  # the curvature of the activation itself
                    Rd += (state.deltas[i] * d2)[:, None] * r_pre[i]
            elif type(m) is nn.Flatten:
                Rd = Rd.reshape(B, K, *rec[1:])
        return out
