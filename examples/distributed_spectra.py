"""Top-5 Hessian eigenvalues and the top of the SGD noise spectrum with the data split across ranks.

    torchrun --nproc_per_node 2 examples/distributed_spectra.py          # gloo on CPU
    torchrun --nproc_per_node 4 examples/distributed_spectra.py --cuda   # NCCL, one GPU per rank

Every rank loads the embedded digits (offline), keeps its contiguous shard, builds the usual operators
on it and wraps them in DistributedOperator; Lanczos then runs unchanged, with the same seed, on every
rank (one all-reduce per product) and every rank gets the same eigenvalues, those of the whole dataset.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from landscape_kernels import DistributedOperator, HessianOperator, NoiseCovarianceOperator, lanczos_eigs
from landscape_kernels.reproduce.torchrun import exit_past_teardown
from landscape_kernels.training.data import load_digits
from landscape_kernels.training.models import mlp


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank (LOCAL_RANK)")
    parser.add_argument("--batch-size", type=int, default=50, help="the SGD batch size of the noise covariance")
    args = parser.parse_args()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.cuda else "cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        x, y = load_digits("train", dtype=torch.float64)
        lo, hi = rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world
        shard = (x[lo:hi].to(device), y[lo:hi].to(device))
        model = mlp((64, 50, 50, 10), seed=0).double().to(device)  # the same weights on every rank
        H = DistributedOperator(lambda d: HessianOperator(model, F.cross_entropy, d, batch_size=256), shard)
        C = DistributedOperator(lambda d: NoiseCovarianceOperator(model, F.cross_entropy, d), shard,
                                sgd_batch_size=args.batch_size, without_replacement=True)
        hess = lanczos_eigs(H, 5, seed=0)
        noise = lanczos_eigs(C, 5, seed=0)
        if rank == 0:
            print(f"{world} ranks, {H.num_samples} samples ({hi - lo} on rank 0), {H.shape[0]} parameters")
            print("top-5 Hessian eigenvalues:", " ".join(f"{v:.6g}" for v in hess.eigenvalues.tolist()))
            print(f"top-5 SGD noise covariance eigenvalues (B = {args.batch_size}):",
                  " ".join(f"{v:.6g}" for v in noise.eigenvalues.tolist()))
        dist.barrier()  # rank 0 has printed before any rank tears its group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # everything is printed; a normal interpreter exit can abort in gloo's C++ teardown now and then,
    # and torchrun would then report the whole job failed
    exit_past_teardown(0)
