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


def loss_separation_auc(losses, wrong):
    """The probability that a wrongly labelled sample's loss exceeds a correctly labelled one's (ties
    count half): the area under the ROC curve of the loss as a mislabel detector (Mann-Whitney U)."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    wrong = torch.as_tensor(wrong, dtype=torch.bool)
    nw, nc = int(wrong.sum()), int((~wrong).sum())
    if nw == 0 or nc == 0:
        raise ValueError(f"loss_separation_auc: needs both groups, got {nc} correct and {nw} wrong samples")
    order = losses.argsort()
    ranks = torch.empty_like(losses)
    ranks[order] = torch.arange(1, len(losses) + 1, dtype=torch.float64)
    sorted_losses = losses[order]  # average the ranks of ties
    _, inverse, counts = torch.unique_consecutive(sorted_losses, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[wrong].sum() - nw * (nw + 1) / 2) / (nw * nc))


@dataclass
class Cleaning:
    """The samples removed (the ``fraction`` with the highest loss) against the true mislabels."""

    removed: torch.Tensor  # indices
    precision: float
    recall: float
    fraction: float

    def to_dict(self):
        return {"removed": len(self.removed), "precision": self.precision, "recall": self.recall,
                "fraction": self.fraction}


def clean_by_loss(losses, wrong, fraction):
    """``Cleaning``: remove round(fraction * N) samples of highest loss; precision and recall of that
    set against the mask ``wrong`` (recall NaN without mislabels, precision NaN when nothing is removed)."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    wrong = torch.as_tensor(wrong, dtype=torch.bool)
    if not 0 <= fraction < 1:
        raise ValueError(f"clean_by_loss: fraction must be in [0, 1), got {fraction!r}")
    k = round(fraction * len(losses))
    removed = losses.argsort(descending=True)[:k]
    hits = int(wrong[removed].sum())
    return Cleaning(removed, hits / k if k else math.nan, hits / int(wrong.sum()) if wrong.any() else math.nan,
                    float(fraction))


@dataclass
class Phases:
    """Phase boundaries of a test-error curve (indices into it): ``starts`` of phases I, II (and III,
    IV when the error rises again), the smoothed curve's minimum, drop and rise."""

    starts: list
    minimum: float
    drop: float
    rise: float

    @property
    def count(self):
        return len(self.starts)

    def to_dict(self):
        return asdict(self)


def smoothed(values, window):
    """Running median over ``window`` points (centred, shrunk at the ends)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    h = window // 2
    return torch.stack([v[max(0, i - h) : i + h + 1].median() for i in range(len(v))])


def phase_boundaries(test_error, window=5, settle=0.1, rise_floor=0.005, rise_fraction=0.25):
    """The phases of a test-error curve e(t) (one value per record), after a running median over
    ``window`` records:

    - drop D = e(0) - e_min, rise R = e_end - e_min, e_end the mean of the last 10 % of the records;
    - phase II starts at the first record with e - e_min <= ``settle`` * D (the descent is over);
    - when R > max(``rise_floor``, ``rise_fraction`` * e_min) the error rises again (by at least a
      quarter of its best value and half a percentage point): phase IV starts at the first
      record after the minimum with e - e_min >= (1 - ``settle``) R (the high plateau), phase III at the
      last record before that with e - e_min <= ``settle`` R (the rise begins); otherwise there are two
      phases (down, flat)."""
    e = smoothed(test_error, window)
    if len(e) < 3:
        raise ValueError(f"phase_boundaries: needs at least 3 records, got {len(e)}")
    t_min = int(e.argmin())
    e_min = float(e[t_min])
    drop = float(e[0]) - e_min
    tail = max(1, len(e) // 10)
    rise = float(e[-tail:].mean()) - e_min
    t2 = max(1, int(((e - e_min) <= settle * max(drop, 0.0)).nonzero()[0]))  # phase I holds the first record
    starts = [0, t2]
    if rise > max(rise_floor, rise_fraction * e_min):
        after = torch.arange(len(e)) > t_min
        t4 = int((after & ((e - e_min) >= (1 - settle) * rise)).nonzero()[0])
        low = ((e - e_min) <= settle * rise) & (torch.arange(len(e)) < t4)
        t3 = max(int(low.nonzero()[-1]) + 1, t2 + 1)  # the rise starts after the last low record
        starts += [t3, max(t4, t3 + 1)]
    return Phases(starts, e_min, drop, rise)
