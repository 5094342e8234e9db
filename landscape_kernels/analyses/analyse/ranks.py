"""The processes one ``analyse`` call spans: this process alone, or every rank of a ``torch.distributed``
group (under ``torchrun``), each holding a shard of the samples.

In a group the operators are ``DistributedOperator``s (one all-reduce per product), and the stages
combine their per-rank parts with the collectives here: sums (losses, spreads) are all-reduced,
per-sample rows (gradient norms, projections) are gathered in rank order. Every rank ends with the
numbers of the union of the shards, so rank 0 alone writes the cache and the report."""
import torch
import torch.distributed as dist

from ...capture.collectives import all_gather_rows, all_reduce_sum, communication_device, per_rank_table
from ...operators.distributed import DistributedOperator


class Ranks:
    """This process alone (``group`` unused) or the ranks of ``group`` (None: the world) when
    ``distributed``; ``distributed=None`` means "when a group of more than one rank is initialised"."""

    def __init__(self, distributed=None, group=None):
        initialised = dist.is_available() and dist.is_initialized()
        if distributed is None:
            distributed = initialised and dist.get_world_size(group) > 1
        elif distributed and not initialised:
            raise RuntimeError("analyse: distributed=True needs torch.distributed initialised (run under torchrun and "
                               "call torch.distributed.init_process_group first)")
        self.distributed, self.group = bool(distributed), group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1

    @property
    def writer(self):
        """Whether this process writes files and prints progress (rank 0)."""
        return self.rank == 0

    def table(self, values):
        """(world, len(values)) float64 table of every rank's ``values``."""
        if not self.distributed:
            return torch.tensor([values], dtype=torch.float64)
        return per_rank_table(values, self.group)

    def all_true(self, flag):
        """Whether ``flag`` holds on every rank."""
        return bool(self.table([float(bool(flag))])[:, 0].min() > 0)

    def sum(self, t):
        """``t`` (a tensor) summed over the ranks, back on its own device and dtype."""
        if not self.distributed:
            return t
        out = all_reduce_sum(t.detach().to(communication_device(self.group), torch.float64).clone(), self.group)
        return out.to(t.device, t.dtype)

    def gather_rows(self, t, sizes):
        """Every rank's rows of ``t`` (``sizes[r]`` on rank r) concatenated in rank order."""
        if not self.distributed:
            return t
        out = all_gather_rows(t.to(communication_device(self.group)), [int(n) for n in sizes], self.group)
        return out.to(t.device)

    def operator(self, build, batches):
        """``build(batches)``, or the operator of the union of every rank's batches."""
        return DistributedOperator(build, batches, self.group) if self.distributed else build(batches)
