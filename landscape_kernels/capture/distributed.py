"""Per-sample gradient statistics over the union of every rank's batch (``torch.distributed``).

Each rank records its own batch with ``PerSampleGradients``; these functions combine the ranks' results
with collectives, never the per-sample gradients themselves: ``distributed_moments`` merges per-rank
means and variances (Chan's update), ``distributed_gram`` gathers the per-sample factors and runs the
fused Gram kernel on the union.
"""
import torch

from ..kernels import ops
from .collectives import all_gather_rows, all_reduce_sum, per_rank_table, require_initialised


def distributed_moments(ps, group=None):
    """(N, mean, variance) of the per-sample gradients over the union of every rank's batch, from a
    ``PerSampleGradients`` that has recorded this rank's batch: dicts name -> tensor in the parameter's
    shape, the population variance (the diagonal of C_1, docs/methods.md), combined by Chan's merge of the per-rank
    means and variances (two all-reduces of 2P + 1 numbers), never of the per-sample gradients."""
    require_initialised("distributed_moments")
    names = ps.param_names
    local_mean, local_var = ps.mean(), ps.variance()
    n = float(ps.batch_size)
    flat_mean = torch.cat([local_mean[k].reshape(-1) for k in names]).double()
    flat_var = torch.cat([local_var[k].reshape(-1) for k in names]).double()
    head = torch.cat([flat_mean.new_tensor([n]), flat_mean * n])
    all_reduce_sum(head, group)
    N = head[0]
    mean = head[1:] / N
    m2 = flat_var * n + n * (flat_mean - mean).square()  # this rank's sum of squares about the global mean
    all_reduce_sum(m2, group)
    var = m2 / N
    out_dtype = local_mean[names[0]].dtype

    def split(flat):
        parts, start = {}, 0
        for k in names:
            size = local_mean[k].numel()
            parts[k] = flat[start : start + size].reshape(local_mean[k].shape).to(out_dtype)
            start += size
        return parts

    return int(N), split(mean), split(var)


def distributed_gram(ps, group=None):
    """(N, N) Gram matrix <g_i, g_j> of the per-sample gradients over the union of every rank's batch
    (rows in rank order), the same on every rank. The per-sample factors of all ranks are gathered
    (memory: every rank holds all of them, the size of the layers' inputs and output gradients, never
    N x P), then the fused Gram kernel runs on the union. The non-batch shapes (e.g. the sequence
    length) must agree across ranks."""
    require_initialised("distributed_gram")
    factors = ps.factors()
    shapes = per_rank_table([ps.batch_size] + [d for _, A, D in factors for d in (*A.shape, *D.shape)], group)
    sizes = [int(n) for n in shapes[:, 0].tolist()]
    others = shapes[:, 1:].clone()
    start = 0
    for _, A, D in factors:  # blank out the batch sizes before comparing the rest
        others[:, start] = 0
        others[:, start + A.dim()] = 0
        start += A.dim() + D.dim()
    if not bool((others == others[0]).all()):
        raise ValueError("distributed_gram: the ranks recorded factors of different shapes beyond the batch (e.g. "
                         "different sequence lengths); every rank needs the same input shape")
    gram = None
    for _, A, D in factors:
        part = ops.per_sample_gram(all_gather_rows(A, sizes, group), all_gather_rows(D, sizes, group),
                                   check_finite=False)
        gram = part if gram is None else gram + part
    return gram
