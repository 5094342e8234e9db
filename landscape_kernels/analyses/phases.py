"""Order parameters of SGD's learning phases (Feng & Tu, Mach. Learn.: Sci. Technol. 2021, arXiv
2101.06509), from the per-sample gradient Gram matrix of the fused kernels, never from P-dimensional
minibatch gradients.

At fixed weights, an ensemble of M disjoint minibatches mu of size B has minibatch gradients
g^mu = (1/B) sum_{p in mu} g_p, so their inner products are block means of the per-sample Gram matrix
G_pq = <g_p, g_q>:

    K_mu,nu = <g^mu, g^nu> = (1/B^2) sum_{p in mu, q in nu} G_pq.

- alignment: the mean over pairs mu != nu of K_mu,nu / sqrt(K_mu,mu K_nu,nu) (the mean pairwise cosine);
- amplitude: the mean over mu of sqrt(K_mu,mu) = <|g^mu|>.

With mislabeled samples, the mean gradients g_c and g_w of the correctly and the wrongly labelled ones
have |g_c|^2, |g_w|^2 and <g_c, g_w> as means of the Gram's blocks; the order parameters are
cos(g_c, g_w) and the relative strength n_w |g_w| / (n_c |g_c|) of the two groups' shares of the full
gradient (n_c g_c + n_w g_w) / N. These definitions are our reading of the paper's abstract (there is
no public code to check them against).
"""
import math
from dataclasses import asdict, dataclass

import torch

from ..capture.persample import PerSampleGradients


def per_sample_gram(model, loss_fn, x, y):
    """(N, N) float64 Gram matrix <g_p, g_q> of the per-sample gradients of ``loss_fn`` (the batch mean
    of per-sample losses) over every trainable parameter, from one forward and backward."""
    ps = PerSampleGradients(model)
    was_training = model.training
    model.eval()  # the order parameters are taken at fixed weights, without dropout noise
    try:
        with ps:
            loss_fn(model(x), y).backward()
        return ps.gram().double()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def minibatch_gram(gram, batches):
    """(M, M) inner products <g^mu, g^nu> of the minibatch mean gradients, ``batches`` an (M, B) index
    tensor into the rows of the per-sample ``gram``."""
    batches = torch.as_tensor(batches, dtype=torch.long)
    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError(f"minibatch_gram: batches must be a non-empty (M, B) index tensor, got shape {tuple(batches.shape)}")
    M, B = batches.shape
    flat = batches.reshape(-1)
    return gram[flat][:, flat].reshape(M, B, M, B).mean(dim=(1, 3))


@dataclass
class EnsembleOrder:
    """Alignment (mean pairwise cosine) and amplitude <|g^mu|> of an ensemble of ``num_batches``
    minibatch gradients of size ``batch_size``."""

    alignment: float
    amplitude: float
    num_batches: int
    batch_size: int

    def to_dict(self):
        return asdict(self)


def ensemble_order(gram, batches):
    """``EnsembleOrder`` of the minibatches ``batches`` ((M, B) indices, M >= 2) over the per-sample ``gram``."""
    K = minibatch_gram(gram, batches)
    M = K.shape[0]
    if M < 2:
        raise ValueError("ensemble_order: the alignment needs at least 2 minibatches")
    norms = K.diagonal().clamp_min(0).sqrt()
    cos = K / torch.outer(norms, norms).clamp_min(1e-300)
    off = ~torch.eye(M, dtype=torch.bool)
    return EnsembleOrder(float(cos[off].mean()), float(norms.mean()), M, int(torch.as_tensor(batches).shape[1]))


@dataclass
class GroupOrder:
    """The correctly (c) and wrongly (w) labelled samples' mean gradients: their norms, cos(g_c, g_w),
    and the relative strength n_w |g_w| / (n_c |g_c|) of their shares of the full gradient."""

    cosine: float
    strength: float
    norm_correct: float
    norm_wrong: float
    num_correct: int
    num_wrong: int

    def to_dict(self):
        return asdict(self)


def group_order(gram, wrong):
    """``GroupOrder`` from the per-sample ``gram`` and the boolean mask ``wrong`` of its rows (at least
    one sample in each group)."""
    wrong = torch.as_tensor(wrong, dtype=torch.bool)
    if wrong.shape != (gram.shape[0],):
        raise ValueError(f"group_order: wrong must be a boolean mask of the {gram.shape[0]} samples, got shape "
                         f"{tuple(wrong.shape)}")
    c, w = (~wrong).nonzero().flatten(), wrong.nonzero().flatten()
    if len(c) == 0 or len(w) == 0:
        raise ValueError(f"group_order: needs correctly and wrongly labelled samples, got {len(c)} and {len(w)}")
    cc, ww, cw = gram[c][:, c].mean(), gram[w][:, w].mean(), gram[c][:, w].mean()
    nc, nw = float(cc.clamp_min(0).sqrt()), float(ww.clamp_min(0).sqrt())
    cosine = float(cw) / (nc * nw) if nc > 0 and nw > 0 else math.nan
    strength = len(w) * nw / (len(c) * nc) if nc > 0 else math.inf
    return GroupOrder(cosine, strength, nc, nw, len(c), len(w))


def disjoint_minibatches(num_samples, batch_size, num_batches, seed=0):
    """(M, B) indices of M disjoint minibatches drawn without replacement (seeded)."""
    if batch_size < 1 or num_batches < 1 or batch_size * num_batches > num_samples:
        raise ValueError(f"disjoint_minibatches: {num_batches} minibatches of {batch_size} need "
                         f"{batch_size * num_batches} samples; there are {num_samples}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=g)[: batch_size * num_batches].reshape(num_batches, batch_size)
