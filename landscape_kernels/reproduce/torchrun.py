"""A command started by ``torchrun --nproc_per_node R``: the process group it joins, the device each
rank uses, and each rank's share of the samples.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address) in every
process; with more than one process the group is initialised here (gloo on the CPU, NCCL on GPUs, each
rank on ``cuda:LOCAL_RANK``) and destroyed when the command ends. Each rank's share of the samples is
``user_model.rank_share``.

A process whose group was started here ends through ``finish_process`` (``os._exit`` once the output
is flushed): left to the interpreter's normal exit, torch's gloo teardown aborts the process now and
then from a C++ destructor ("terminate called without an active exception", about 1 run in 10 on a
loaded 2-core CPU), after every result is written, and torchrun then reports the whole job failed."""
import os
import sys
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


_STARTED_HERE = []  # set once torchrun_group has started (and destroyed) a process group


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
    _STARTED_HERE.append(True)
    try:
        yield
        # every rank finished before the group goes: rank 0 still writes the report after the last
        # collective, and tearing gloo down under a peer can abort the process at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def finish_process(code):
    """``code``, returned as is unless this process's group was started by ``torchrun_group``: then the
    process exits here with it, skipping the C++ teardown that can abort it (see the module docstring)."""
    if not _STARTED_HERE:
        return code
    exit_past_teardown(code)


def exit_past_teardown(code=0):
    """Flush and end this process with ``code`` now (``os._exit``), without the interpreter's exit, for
    a process that used a gloo group (a torchrun rank, a ``torch.multiprocessing`` worker) and has
    written all it produces."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
