"""A command started by ``torchrun --nproc_per_node R``: the process group it joins, the device each
rank uses, and each rank's share of the samples.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address) in every
process; with more than one process the group is initialised here (gloo on the CPU, NCCL on GPUs, each
rank on ``cuda:LOCAL_RANK``) and destroyed when the command ends. Each rank's share of the samples is
``user_model.rank_share``."""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def torchrun_world():
    """The number of processes ``torchrun`` started (1 outside it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None


def rank_device(device):
    """``cuda`` is this rank's GPU (``cuda:LOCAL_RANK``) under torchrun; any other device as given."""
    if device == "cuda" and torchrun_world() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextmanager
def torchrun_group(device="cpu"):
    """Inside: the process group of the ``torchrun`` processes (nothing outside torchrun, or when a
    group is already initialised: that one is used and left as it is)."""
    if torchrun_world() <= 1 or dist.is_initialized():
        yield
        return
    device = rank_device(device)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
