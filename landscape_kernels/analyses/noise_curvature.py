"""Noise covariance against curvature for one weight matrix (Zhang, Yang & Tu 2026).

For a network whose layers after the chosen Linear are piecewise linear (Linear, ReLU, LeakyReLU,
Identity), the per-sample Hessian of the loss with respect to that layer's weight W (out x in,
row-major vec) is exactly

    h_p = G_p (x) a_p a_p^T,   G_p = M_p^T Lambda_p M_p,

where a_p is the layer's input, M_p = d(outputs)/d(pre-activation of the layer) and Lambda_p the
Hessian of the per-sample loss in the outputs (the outputs are linear in W inside each activation
region, so no second-derivative term survives). Hence the layer Hessian H = E_p[h_p] and the second
moment E_p[h_p^2] = E_p[G_p^2 (x) |a_p|^2 a_p a_p^T] are formed from N small factors, never from N
D x D matrices. The minibatch covariance C comes from one shuffled pass, its minibatch gradients summed
from per-sample gradients by the fused kernels. ``superlinear_relation`` then gives the exponent gamma
of C_ii ~ H_ii^gamma in H's eigenbasis and the commutator against a random-rotation baseline.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..capture.persample import PerSampleGradients
from .fits import power_law_fit

PIECEWISE_LINEAR = (nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Identity)


def mse_on_softmax(logits, targets):
    """The paper's "MSE on softmax outputs": mean over samples and classes of (softmax(logits) - onehot)^2."""
    probs = torch.softmax(logits, dim=1)
    classes = torch.arange(logits.shape[1], device=logits.device)
    return F.mse_loss(probs, (targets[:, None] == classes).to(probs.dtype))  # one-hot, vmap-safe


def _split_sequential(model, param):
    """(head, layer, tail) of an ``nn.Sequential`` around the Linear whose weight is ``param``."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"layer factors: model must be an nn.Sequential, got {type(model).__name__}")
    name, _, attr = param.rpartition(".")
    modules = dict(model.named_children())
    if attr != "weight" or name not in modules or not isinstance(modules[name], nn.Linear):
        linear = [f"{n}.weight" for n, m in model.named_children() if isinstance(m, nn.Linear)]
        raise ValueError(f"layer factors: param must be the weight of a Linear child of the model, one of {linear}; "
                         f"got {param!r}")
    children = list(model.children())
    index = list(modules).index(name)
    tail = children[index + 1 :]
    bad = [f"{list(modules)[index + 1 + i]} ({type(m).__name__})" for i, m in enumerate(tail)
           if not isinstance(m, PIECEWISE_LINEAR)]
    if bad:
        raise ValueError("layer factors: the exact per-sample Hessian identity needs piecewise-linear layers after "
                         f"{param} (Linear, ReLU, LeakyReLU, Identity); unsupported: {', '.join(bad)}")
    return nn.Sequential(*children[:index]), children[index], nn.Sequential(*tail)


@dataclass
class LayerFactors:
    """Per-sample factors of the layer Hessian: inputs ``a`` (N, in) and ``G`` (N, out, out), so that
    h_p = G[p] (x) a[p] a[p]^T exactly (row-major vec of the (out, in) weight)."""

    a: torch.Tensor
    G: torch.Tensor


def layer_factors(model, loss_fn, x, y, param, chunk=4096, dtype=torch.float64):
    """``LayerFactors`` of the weight ``param`` (e.g. "2.weight") of an ``nn.Sequential`` over (x, y).

    ``loss_fn(outputs, targets)`` is the batch-mean loss (F.cross_entropy, ``mse_on_softmax``, ...);
    Lambda_p is its Hessian in the outputs of one sample (torch.func). Computed in ``dtype``."""
    head, layer, tail = _split_sequential(model, param)
    if x.shape[0] == 0:
        raise ValueError("layer_factors: x is empty")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"layer_factors: x and y differ in samples: {x.shape[0]} and {y.shape[0]}")
    weight = layer.weight.detach().to(dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    tail = _copy_in(tail, dtype)
    head = _copy_in(head, dtype)

    def tail_out(z):
        return tail(z[None])[0]

    def sample_loss(f, t):
        return loss_fn(f[None], t[None])

    jac = torch.func.vmap(torch.func.jacrev(tail_out))
    out_hessian = torch.func.vmap(torch.func.hessian(sample_loss))
    As, Gs = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            a = head(x[i : i + chunk].to(dtype))
            z = F.linear(a, weight, bias)
            M = jac(z)                                     # (n, C, out)
            Lam = out_hessian(tail(z), y[i : i + chunk])   # (n, C, C)
            As.append(a)
            Gs.append(M.transpose(1, 2) @ Lam @ M)
    return LayerFactors(torch.cat(As), torch.cat(Gs))


def _copy_in(module, dtype):
    module = copy.deepcopy(module).to(dtype).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _mean_kron(G, a, chunk=2048):
    """(1/N) sum_p G[p] (x) a[p] a[p]^T as a dense (out*in, out*in) matrix."""
    N, out, inp = G.shape[0], G.shape[1], a.shape[1]
    acc = torch.zeros(out * out, inp * inp, dtype=G.dtype, device=G.device)
    for i in range(0, N, chunk):
        g, v = G[i : i + chunk].reshape(-1, out * out), a[i : i + chunk]
        acc += g.T @ (v[:, :, None] * v[:, None, :]).reshape(-1, inp * inp)
    return (acc / N).reshape(out, out, inp, inp).permute(0, 2, 1, 3).reshape(out * inp, out * inp)


def layer_hessian(factors):
    """Dense Hessian H = E_p[h_p] of the mean loss in the layer weight."""
    return _mean_kron(factors.G, factors.a)


def hessian_second_moment(factors):
    """Dense E_p[h_p^2] = E_p[G_p^2 (x) |a_p|^2 a_p a_p^T] (the C ~ E_p[h_p^2] prediction of Zhang, Yang & Tu 2026)."""
    return _mean_kron(factors.G @ factors.G, factors.a * factors.a.norm(dim=1, keepdim=True))


def minibatch_assignment(num_samples, batch_size, seed=0):
    """(num_samples,) minibatch index of every sample in one shuffled pass (seeded), -1 for the samples
    of a final partial batch, which is dropped so every minibatch has ``batch_size`` samples."""
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"minibatch_assignment: batch_size must be in [1, {num_samples}], got {batch_size}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    batch = torch.full((num_samples,), -1, dtype=torch.long)
    kept = (num_samples // batch_size) * batch_size
    batch[perm[:kept]] = torch.arange(kept) // batch_size
    return batch


def _grouped_by_minibatch(batch):
    """Sample indices sorted by minibatch (a stable sort, so each minibatch keeps its samples' order),
    the dropped samples (-1) left out."""
    return torch.argsort(batch, stable=True)[int((batch < 0).sum()):]


def minibatch_gradients(model, loss_fn, x, y, param, batch_size, seed=0, method="factored", chunk=4096):
    """(num_batches, D) float64 gradients of the minibatch-mean loss in ``param`` over one shuffled pass.

    ``method``:
    - "factored" (a Linear weight): the layer's per-sample factors, input a_p and output gradient
      delta_p, from one forward/backward per chunk of whole minibatches, contracted into every
      minibatch's (1/B) sum delta_p a_p^T by one batched GEMM (O(N D), nothing per-sample materialised);
    - "fused": per-sample gradients summed into their minibatches by the ``per_sample_weighted_sum``
      kernel (any layer ``PerSampleGradients`` supports; O(N D num_batches));
    - "loop": one forward/backward per minibatch, the materialising baseline.
    All give the same matrix; ``loss_fn`` must be the mean of per-sample losses."""
    batch = minibatch_assignment(x.shape[0], batch_size, seed)
    nb = int(batch.max()) + 1
    named = dict(model.named_parameters())
    if param not in named:
        raise ValueError(f"minibatch_gradients: param {param!r} is not a parameter of the model; "
                         f"it has {sorted(named)}")
    target = named[param]
    if method == "loop":
        order = _grouped_by_minibatch(batch)
        out = torch.empty(nb, target.numel(), dtype=torch.float64)
        for b in range(nb):
            idx = order[b * batch_size : (b + 1) * batch_size]
            (g,) = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]), [target])
            out[b] = g.reshape(-1).double()
        return out
    if method == "factored":
        return _factored_minibatch_gradients(model, loss_fn, x, y, param, batch, batch_size, chunk)
    if method != "fused":
        raise ValueError(f"minibatch_gradients: method must be 'factored', 'fused' or 'loop', got {method!r}")
    layer = param.rpartition(".")[0]
    out = torch.zeros(nb, target.numel(), dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xb, yb, bb = x[i : i + chunk], y[i : i + chunk], batch[i : i + chunk]
        keep = bb >= 0
        if not keep.any():
            continue
        xb, yb, bb = xb[keep], yb[keep], bb[keep]
        weights = torch.zeros(xb.shape[0], nb, dtype=target.dtype)
        weights[torch.arange(xb.shape[0]), bb] = 1.0 / batch_size
        ps = PerSampleGradients(model, layers=[layer], loss_reduction="mean")
        with ps:
            model.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
        out += ps.weighted_sum(weights)[param].reshape(nb, -1).double()
    model.zero_grad(set_to_none=True)
    return out


def _factored_minibatch_gradients(model, loss_fn, x, y, param, batch, batch_size, chunk):
    name, _, attr = param.rpartition(".")
    module = dict(model.named_modules()).get(name)
    if attr != "weight" or not isinstance(module, nn.Linear):
        raise ValueError(f"minibatch_gradients: method 'factored' needs the weight of an nn.Linear, got {param!r}; "
                         "use method='fused'")
    order = _grouped_by_minibatch(batch)
    nb = order.numel() // batch_size
    per_chunk = max(1, chunk // batch_size)
    out = torch.empty(nb, module.weight.numel(), dtype=torch.float64)
    captured = {}

    def hook(mod, inputs, output):
        captured["a"], captured["z"] = inputs[0], output

    handle = module.register_forward_hook(hook)
    try:
        for b0 in range(0, nb, per_chunk):
            idx = order[b0 * batch_size : min(nb, b0 + per_chunk) * batch_size]
            loss = loss_fn(model(x[idx]), y[idx]) * idx.numel()  # the sum of per-sample losses
            (delta,) = torch.autograd.grad(loss, captured["z"])   # row p: d ell_p / d z_p
            k = idx.numel() // batch_size
            a = captured["a"].detach().reshape(k, batch_size, -1)
            g = delta.reshape(k, batch_size, -1).transpose(1, 2) @ a  # (k, out, in)
            out[b0 : b0 + k] = g.reshape(k, -1).double() / batch_size
    finally:
        handle.remove()
        captured.clear()
    return out


def minibatch_covariance(gradients):
    """C = mean_b g_b g_b^T - gbar gbar^T of (num_batches, D) minibatch gradients (contains the 1/B)."""
    mean = gradients.mean(0)
    return gradients.T @ gradients / gradients.shape[0] - torch.outer(mean, mean)


def random_rotation(dim, seed=0, dtype=torch.float64):
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def relative_commutator(C, H):
    """||CH - HC||_F / ||CH||_F."""
    CH = C @ H
    return float(torch.linalg.matrix_norm(CH - CH.T) / torch.linalg.matrix_norm(CH))  # HC = (CH)^T


@dataclass
class SuperlinearRelation:
    """C_ii = v_i^T C v_i against H_ii = lambda_i over the top ``top`` eigen-directions of H (pairs with
    a non-positive entry dropped): ``gamma`` is the OLS slope of log10 C_ii on log10 H_ii (a
    ``PowerLawFit``: stderr, ci95, r2); ``commutator`` is ||CH - HC||_F / ||CH||_F and
    ``random_commutator`` the same with H randomly rotated; ``predicted`` the fit of
    v_i^T E_p[h_p^2] v_i on H_ii when the second moment was given."""

    eigenvalues: np.ndarray
    H_ii: np.ndarray
    C_ii: np.ndarray
    used: np.ndarray
    gamma: object
    commutator: float
    random_commutator: float
    predicted_ii: np.ndarray = None
    predicted: object = None

    def to_dict(self):
        d = {"top": int(self.H_ii.size), "used": int(self.used.sum()), "gamma": self.gamma.to_dict(),
             "commutator": self.commutator, "random_commutator": self.random_commutator,
             "eigenvalues": self.eigenvalues.tolist(), "H_ii": self.H_ii.tolist(), "C_ii": self.C_ii.tolist()}
        if self.predicted is not None:
            d["predicted"] = self.predicted.to_dict()
            d["predicted_ii"] = self.predicted_ii.tolist()
        return d


def superlinear_relation(H, C, top=500, second_moment=None, seed=0):
    """The measurement of Zhang, Yang & Tu 2026 from the dense layer Hessian ``H`` and minibatch covariance ``C``."""
    for name, M in (("H", H), ("C", C)) + ((("second_moment", second_moment),) if second_moment is not None else ()):
        if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape != H.shape:
            raise ValueError(f"superlinear_relation: {name} must be a square matrix of H's shape {tuple(H.shape)}, "
                             f"got {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise ValueError(f"superlinear_relation: {name} has NaN or Inf entries")
    if not 3 <= top <= H.shape[0]:
        raise ValueError(f"superlinear_relation: top must be in [3, {H.shape[0]}], got {top}")
    H, C = H.double(), C.double()
    values, vectors = torch.linalg.eigh((H + H.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    V = vectors[:, :top]
    h_ii, c_ii = values[:top].numpy(), ((C @ V) * V).sum(0).numpy()
    used = (h_ii > 0) & (c_ii > 0)
    if used.sum() < 3:
        raise ValueError(f"superlinear_relation: only {int(used.sum())} of the top {top} directions have positive "
                         "H_ii and C_ii; no exponent can be fitted")
    gamma = power_law_fit(h_ii[used], c_ii[used])
    Q = random_rotation(H.shape[0], seed)
    relation = SuperlinearRelation(values.numpy(), h_ii, c_ii, used, gamma, relative_commutator(C, H),
                                   relative_commutator(C, Q @ H @ Q.T))
    if second_moment is not None:
        p_ii = ((second_moment.double() @ V) * V).sum(0).numpy()
        keep = (h_ii > 0) & (p_ii > 0)
        relation.predicted_ii = p_ii
        relation.predicted = power_law_fit(h_ii[keep], p_ii[keep]) if keep.sum() >= 3 else None
    return relation
