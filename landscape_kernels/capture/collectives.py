"""The ``torch.distributed`` collectives the data-parallel statistics, operators and trajectory PCA use
(gloo on CPU, NCCL on GPU), each failing with an error that says what went wrong on which rank."""
import torch
import torch.distributed as dist


def all_reduce_sum(t, group=None):
    """Sum ``t`` over the ranks of ``group`` in place and return it; a rank left waiting past the
    group's timeout (another rank stopped making the same calls) gets an error that says so."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as exc:  # gloo / NCCL raise a RuntimeError subclass when the group's timeout passes
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise RuntimeError(
                f"landscape_kernels (distributed): rank {dist.get_rank(group)} waited for the other ranks longer than the "
                "process group's timeout; every rank must make the same calls (the same products, in the same order, "
                "with the same seeds) and none may have stopped. Original error: " + str(exc)) from exc
        raise
    return t


def require_initialised(name):
    """Raise a clear error when ``name`` is called outside an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "(e.g. under torchrun) first")


def communication_device(group=None):
    """Where the group's collectives take tensors: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def per_rank_table(values, group=None):
    """(world, len(values)) float64 CPU table of every rank's ``values`` (one all-reduce of a one-hot layout)."""
    table = torch.zeros(dist.get_world_size(group), len(values), dtype=torch.float64, device=communication_device(group))
    table[dist.get_rank(group)] = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(table, group).cpu()


def all_gather_rows(t, sizes, group=None):
    """Concatenate every rank's ``t`` (rows = its batch, ``sizes[r]`` rows on rank r, the other dims
    equal) in rank order."""
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
