"""The activity–weight duality and the generalisation-gap decomposition of Feng, Zhang & Tu (Nat. Mach.
Intell. 2023, arXiv 2203.10736); ``docs/reproductions/duality.md``.

Duality: for a dense layer y = W a, the input change a -> a + da gives, for everything downstream, the
same activations as the weight change of minimal norm

    dW = (W da) a^T / |a|^2        ((W + dW) a = W a + W da = W (a + da)).

Decomposition: pair each test sample k with its nearest training sample of the same class (pixel
space). With a_k the training sample's input to the layer and da_k the test sample's minus it, the dual
dW_k turns the training sample into the test sample for the layers above, so the loss change
dl_k = l(x_k, W + dW_k) - l(x_k, W) is exactly l(test_k) - l(train_k). The secant gradient
g_k = dl_k dW_k / |dW_k|^2 has g_k . dW_k = dl_k. Projected on the orthonormal eigenvectors v_n of the
layer Hessian (theta_kn = dW_k . v_n, g_kn = g_k . v_n), the mean over pairs is

    mean_k dl_k = sum_n mean_k g_kn theta_kn = sum_n (mu_g,n mu_w,n + c_n sigma_g,n sigma_w,n)

with means mu, population standard deviations sigma and correlations c over the pairs: an identity
over the complete eigenbasis. It differs from the measured gap (test loss - training loss, over the
whole sets) by the paired training samples' mean loss minus the whole training loss. sigma_g carries
the sharpness of each direction, sigma_w the spread of the dual weights (which scales with the weight
norm: |dW_k| <= |W| |da_k| / |a_k|).

Everything runs in float64 on a copy of the model.
"""
import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap

from .noise_curvature import layer_factors, layer_hessian

TOP_FRACTIONS = (0.01, 0.05, 0.1, 0.25)


def dual_weight_change(weight, a, delta_a):
    """(N, out, in) minimal-norm dual weight changes dW_k = (W da_k) a_k^T / |a_k|^2 of a dense layer with
    weight (out, in) for inputs ``a`` (N, in) changed by ``delta_a`` (N, in); a zero input has no dual
    (its rows are zero) and is an error."""
    if weight.dim() != 2:
        raise ValueError(f"dual_weight_change: weight must be (out, in), got shape {tuple(weight.shape)}")
    if a.dim() != 2 or a.shape != delta_a.shape or a.shape[1] != weight.shape[1]:
        raise ValueError(f"dual_weight_change: a and delta_a must both be (N, {weight.shape[1]}), got "
                         f"{tuple(a.shape)} and {tuple(delta_a.shape)}")
    sq = (a * a).sum(1)
    if bool((sq == 0).any()):
        raise ValueError(f"dual_weight_change: {int((sq == 0).sum())} input(s) a are zero (every unit silent); "
                         "no weight change reproduces their change")
    return (delta_a @ weight.T)[:, :, None] * (a / sq[:, None])[:, None, :]


def nearest_same_class(query_x, query_y, pool_x, pool_y, block=1024):
    """For every query sample, the index into ``pool`` of its nearest pool sample (Euclidean, in the
    flattened inputs) of the same class. Distances are taken ``block`` queries at a time against one
    class of the pool, so no (queries x pool) matrix is formed."""
    qx, px = query_x.reshape(query_x.shape[0], -1), pool_x.reshape(pool_x.shape[0], -1)
    if qx.shape[1] != px.shape[1]:
        raise ValueError(f"nearest_same_class: query and pool inputs differ in size: {qx.shape[1]} and {px.shape[1]}")
    out = torch.full((qx.shape[0],), -1, dtype=torch.long)
    for c in torch.unique(query_y).tolist():
        queries = (query_y == c).nonzero().flatten()
        members = (pool_y == c).nonzero().flatten()
        if len(members) == 0:
            raise ValueError(f"nearest_same_class: class {c} has no sample in the pool (training set)")
        pool_c = px[members]
        for i in range(0, len(queries), block):
            q = queries[i : i + block]
            out[q] = members[torch.cdist(qx[q].double(), pool_c.double()).argmin(1)].cpu()
    return out


def layer_inputs(model, x, param):
    """(N, in) inputs of the Linear layer whose weight is ``param`` (the model in eval mode)."""
    module = _linear_of(model, param)
    seen = []
    handle = module.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0].reshape(x.shape[0], -1)


def _linear_of(model, param):
    name, _, attr = param.rpartition(".")
    module = dict(model.named_modules()).get(name)
    if attr != "weight" or not isinstance(module, torch.nn.Linear):
        linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        raise ValueError(f"param must be the weight of a Linear layer of the model, one of {linear}; got {param!r}")
    return module


def per_sample_losses(model, loss_fn, x, y, weights=None, param=None):
    """(N,) loss of each sample; with ``weights`` (N, *shape of param), sample k is evaluated with the
    layer weight ``param`` replaced by ``weights[k]`` (vmap over samples)."""
    model.eval()
    with torch.no_grad():
        if weights is None:
            return vmap(lambda xi, yi: loss_fn(model(xi[None]), yi[None]))(x, y)
        others = {n: p.detach() for n, p in model.named_parameters() if n != param}

        def one(w, xi, yi):
            return loss_fn(functional_call(model, {**others, param: w}, (xi[None],)), yi[None])

        return vmap(one)(weights, x, y)


@dataclass
class GapDecomposition:
    """The decomposition of one trained model (see the module docstring). Per direction n (eigenvalues
    descending): ``eigenvalues``, ``mu_w``, ``mu_g``, ``sigma_w``, ``sigma_g``, ``c`` and ``terms`` =
    mu_g mu_w + c sigma_g sigma_w; ``estimate`` = sum of the terms; ``paired_gap`` = mean over pairs of
    l(test_k) - l(train_k) (equal to ``estimate`` up to rounding: ``identity_residual``); ``real_gap`` =
    test loss - training loss; ``top_share``: {fraction: share of the estimate carried by that top
    fraction of the directions}; ``weight_norm`` |W|_F, ``sigma_w_total`` = sqrt(sum sigma_w^2),
    ``sigma_g_total`` = sqrt(sum sigma_g^2); ``duality_error``: the largest |l(x_k, W + dW_k) - l(test_k)|;
    ``pairs``: the pairs used; ``pairs_without_dual``: test samples left out because their training
    partner's input to the layer is zero (no weight change can move it)."""

    eigenvalues: np.ndarray
    mu_w: np.ndarray
    mu_g: np.ndarray
    sigma_w: np.ndarray
    sigma_g: np.ndarray
    c: np.ndarray
    terms: np.ndarray
    estimate: float
    paired_gap: float
    identity_residual: float
    real_gap: float
    train_loss: float
    test_loss: float
    paired_train_loss: float
    top_share: dict
    weight_norm: float
    sigma_w_total: float
    sigma_g_total: float
    duality_error: float
    pairs: int
    pairs_without_dual: int

    ARRAYS = ("eigenvalues", "mu_w", "mu_g", "sigma_w", "sigma_g", "c", "terms")

    def to_dict(self, arrays=False):
        d = asdict(self)
        for name in self.ARRAYS:
            d[name] = d[name].tolist() if arrays else None
        if not arrays:
            d = {k: v for k, v in d.items() if v is not None}
        d["top_share"] = {str(k): v for k, v in self.top_share.items()}
        return d


def direction_statistics(theta, g):
    """(mu_w, mu_g, sigma_w, sigma_g, c) over the rows (pairs) of the projections ``theta`` and ``g``
    (K, D): means, population standard deviations, correlations (0 where a spread is 0)."""
    mu_w, mu_g = theta.mean(0), g.mean(0)
    sigma_w, sigma_g = theta.std(0, correction=0), g.std(0, correction=0)
    cov = ((theta - mu_w) * (g - mu_g)).mean(0)
    spread = sigma_w * sigma_g
    c = torch.where(spread > 0, cov / torch.where(spread > 0, spread, torch.ones_like(spread)), torch.zeros_like(cov))
    return mu_w, mu_g, sigma_w, sigma_g, c


def top_shares(terms, fractions=TOP_FRACTIONS):
    """{fraction: share of sum(terms) carried by the first ceil(fraction * D) terms} (terms ordered by
    eigenvalue, largest first)."""
    total = float(terms.sum())
    D = terms.shape[0]
    return {f: (float(terms[: max(1, math.ceil(f * D))].sum()) / total if total != 0 else math.nan) for f in fractions}


def gap_decomposition(model, loss_fn, param, train, test, hessian=None, block=1024):
    """``GapDecomposition`` of ``model`` (an ``nn.Sequential`` whose layers after ``param``'s Linear are
    piecewise linear, for the exact layer Hessian; or any model with ``hessian`` given as the dense
    (D, D) layer Hessian in row-major order) on ``train`` and ``test`` (inputs, class targets) pairs.
    Test samples whose class is absent from the training set are an error."""
    model = copy.deepcopy(model).double().eval()
    (xtr, ytr), (xte, yte) = train, test
    xtr, xte = xtr.double(), xte.double()
    whole_test = (xte, yte)
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise ValueError("gap_decomposition: train and test need at least one sample each")
    W = _linear_of(model, param).weight.detach()
    pair = nearest_same_class(xte, yte, xtr, ytr, block)
    a_train = layer_inputs(model, xtr[pair], param)
    keep = (a_train * a_train).sum(1) > 0  # a training sample that silences the layer's input has no dual
    if not bool(keep.any()):
        raise ValueError(f"gap_decomposition: every paired training sample gives a zero input to {param}")
    pair, a_train, xte, yte = pair[keep], a_train[keep], xte[keep], yte[keep]
    xp, yp = xtr[pair], ytr[pair]
    a_test = layer_inputs(model, xte, param)
    dW = dual_weight_change(W, a_train, a_test - a_train)               # (K, out, in)
    l_pair, l_test = per_sample_losses(model, loss_fn, xp, yp), per_sample_losses(model, loss_fn, xte, yte)
    l_moved = per_sample_losses(model, loss_fn, xp, yp, W + dW, param)  # the training sample, dual weights
    dl = l_moved - l_pair
    flat = dW.reshape(dW.shape[0], -1)
    sq = (flat * flat).sum(1)
    g = torch.where(sq[:, None] > 0, flat * (dl / torch.where(sq > 0, sq, torch.ones_like(sq)))[:, None],
                    torch.zeros_like(flat))
    if hessian is None:
        hessian = layer_hessian(layer_factors(model, loss_fn, xtr, ytr, param))
    H = torch.as_tensor(hessian, dtype=torch.float64)
    if H.shape != (flat.shape[1], flat.shape[1]):
        raise ValueError(f"gap_decomposition: hessian must be ({flat.shape[1]}, {flat.shape[1]}), got {tuple(H.shape)}")
    lam, V = torch.linalg.eigh((H + H.T) / 2)
    lam, V = lam.flip(0), V.flip(1)
    mu_w, mu_g, sigma_w, sigma_g, c = direction_statistics(flat @ V, g @ V)
    terms = mu_g * mu_w + c * sigma_g * sigma_w
    estimate, paired = float(terms.sum()), float(dl.mean())
    train_loss = float(per_sample_losses(model, loss_fn, xtr, ytr).mean())
    test_loss = float(l_test.mean()) if bool(keep.all()) else float(per_sample_losses(model, loss_fn, *whole_test).mean())
    to_np = lambda t: t.cpu().numpy()  # noqa: E731
    return GapDecomposition(
        eigenvalues=to_np(lam), mu_w=to_np(mu_w), mu_g=to_np(mu_g), sigma_w=to_np(sigma_w), sigma_g=to_np(sigma_g),
        c=to_np(c), terms=to_np(terms), estimate=estimate, paired_gap=paired,
        identity_residual=abs(estimate - paired), real_gap=test_loss - train_loss, train_loss=train_loss,
        test_loss=test_loss, paired_train_loss=float(l_pair.mean()), top_share=top_shares(to_np(terms)),
        weight_norm=float(W.norm()), sigma_w_total=float(sigma_w.norm()), sigma_g_total=float(sigma_g.norm()),
        duality_error=float((l_moved - l_test).abs().max()), pairs=int(xte.shape[0]),
        pairs_without_dual=int((~keep).sum()))
