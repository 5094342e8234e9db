"""Data-parallel curvature operators over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank holds a shard of the data and builds the usual operator on it; ``DistributedOperator``
combines the ranks' products with one all-reduce per ``matmat`` so that every rank gets the operator of
the union of the shards, up to rounding. The eigensolvers and estimators then run unchanged on every
rank (give them the same seed): ``lanczos_eigs(DistributedOperator(...), k, seed=0)`` returns the same
eigenpairs on every rank.

- Mean operators (``HessianOperator``, ``GGNOperator``, ``FisherOperator``): A V = sum_r n_r A_r V / N.
- ``NoiseCovarianceOperator`` (centred): C V = sum_r n_r F_r V / N - gbar (gbar^T V) with the global
  mean gradient gbar = sum_r n_r gbar_r / N (the per-rank means are all-reduced once, at construction),
  so the result is the covariance of the union, not an average of per-rank covariances.

The per-sample statistics over ranks are in ``capture.distributed``, the parameter-sharded trajectory
PCA and stores in ``trajectory.distributed``.

Launch with ``torchrun --nproc_per_node R script.py`` (``docs/guide/distributed.md``).
"""
import torch

from ..capture.collectives import all_reduce_sum, per_rank_table, require_initialised
from ..capture.model import count_samples
from .base import Operator
from .noise import NoiseCovarianceOperator, sgd_noise_scale


class DistributedOperator(Operator):
    """The operator of the union of every rank's data shard.

    Args:
        build: a callable ``data -> operator`` (e.g. ``lambda d: HessianOperator(model, loss_fn, d)``)
            called with this rank's ``data``; ranks whose shard is empty are found before anything is
            built, and every rank then raises the same error (no rank is left waiting in a collective).
        data: this rank's shard: an (inputs, targets) pair or a list of such batches (what ``build``
            takes).
        group: the process group (default: the world).
        sgd_batch_size, without_replacement: for a noise covariance, the SGD scaling of
            ``NoiseCovarianceOperator`` applied with the global N (build the local operator without it).
    """

    def __init__(self, build, data, group=None, sgd_batch_size=None, without_replacement=False):
        require_initialised("DistributedOperator")
        self.group = group
        if not isinstance(data, (tuple, list)):
            raise TypeError("DistributedOperator: data must be an (inputs, targets) pair or a list of such batches "
                            f"(it is read twice: counted, then built on), got {type(data).__name__}")
        local = count_samples(data)
        counts = per_rank_table([local], group)[:, 0]  # every rank learns every shard size
        empty = [r for r, n in enumerate(counts.tolist()) if n == 0]
        if empty:
            raise ValueError(f"DistributedOperator: the data shard of rank(s) {empty} is empty; every rank needs "
                             f"at least one sample (shard sizes {[int(n) for n in counts.tolist()]})")
        self.local_samples, self.num_samples = int(local), int(counts.sum())
        self.op = build(data)
        self.shape, self.dtype, self.device = self.op.shape, self.op.dtype, self.op.device
        self.column_chunk = None  # the local operator chunks its own columns
        self.centred = isinstance(self.op, NoiseCovarianceOperator) and self.op.centred
        if isinstance(self.op, NoiseCovarianceOperator) and self.op.scale != 1.0:
            raise ValueError("DistributedOperator: build the local noise covariance without sgd_batch_size and pass "
                             "sgd_batch_size to DistributedOperator, which scales with the global N")
        if sgd_batch_size is not None and not isinstance(self.op, NoiseCovarianceOperator):
            raise ValueError("DistributedOperator: sgd_batch_size applies to a noise covariance only")
        self.scale = sgd_noise_scale(sgd_batch_size, self.num_samples, without_replacement)
        self.mean_gradient = None
        if self.centred:
            local = self.op.mean_gradient() * self.local_samples
            self.mean_gradient = all_reduce_sum(local, group) / self.num_samples

    def _matmat(self, V):
        weight = self.local_samples / self.num_samples
        if self.centred:  # the uncentred local moment, centred with the global mean afterwards
            out = all_reduce_sum(self.op.second_moment_matmat(V) * weight, self.group)
            g = self.mean_gradient
            out = out - torch.outer(g, g @ V)
        else:
            out = all_reduce_sum(self.op.matmat(V) * weight, self.group)
        return out * self.scale
