"""Trajectories whose parameters are sharded across ranks (each rank records its slice of theta, as
under FSDP): PCA in the process group, and one crash-safe store per rank."""
import torch
import torch.distributed as dist

from ..capture.collectives import all_reduce_sum, per_rank_table, require_initialised
from .sharded import rank_store_path


def sharded_pca(X, n_components=None, group=None):
    """PCA of a trajectory whose parameters are sharded across ranks (each rank records its slice of
    theta, as under FSDP): ``X`` is this rank's (T, N_r) block of the same T snapshots on every rank.
    The T x T Gram matrix of the centred snapshots is all-reduced (one collective of T^2 numbers); its
    eigendecomposition, the same on every rank, gives the variances (sample covariance, divided by
    T - 1, as ``StreamingPCA``) and each rank's columns of the components, which stay sharded.

    Returns (explained_variance (k,), components (k, N_r) of this rank, mean (N_r,)), float64, with
    StreamingPCA's sign rule (each component's entry of largest magnitude, over all ranks, positive)."""
    require_initialised("sharded_pca")
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"sharded_pca: X must be a (T, N_r) tensor, got {getattr(X, 'shape', type(X).__name__)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T = X.shape[0]
    counts = per_rank_table([T], group)[:, 0]
    if not bool((counts == T).all()):
        raise ValueError(f"sharded_pca: every rank needs the same snapshots; snapshot counts per rank "
                         f"{[int(c) for c in counts.tolist()]}")
    if T < 2:
        raise ValueError(f"sharded_pca: needs at least 2 snapshots, got {T}")
    mean = X.double().mean(0)
    Xc = X.double() - mean
    G = all_reduce_sum(Xc @ Xc.T, group)
    evals, U = torch.linalg.eigh(G)
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    k = T - 1 if n_components is None else int(n_components)
    if not 1 <= k <= T - 1:
        raise ValueError(f"sharded_pca: n_components must be in [1, T - 1 = {T - 1}], got {n_components}")
    scale = evals[:k].sqrt()
    components = (Xc.T @ U[:, :k] / torch.where(scale > 0, scale, torch.ones_like(scale))).T  # (k, N_r)
    # the global sign rule: the entry of largest magnitude over all ranks is made positive
    best = torch.zeros(world, k, 2, dtype=torch.float64)
    if components.shape[1]:
        idx = components.abs().argmax(1)
        picked = components.gather(1, idx[:, None])[:, 0]
        best[rank, :, 0], best[rank, :, 1] = picked.abs(), torch.sign(picked)
    all_reduce_sum(best, group)
    signs = best[best[:, :, 0].argmax(0), torch.arange(k), 1]
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    return evals[:k] / (T - 1), components, mean


def rank_trajectory_store(root, group=None):
    """This rank's trajectory store directory under ``root`` (pass it as ``TrajectoryRecorder(store=...)``);
    every rank records its own slice of theta, and ``open_sharded_trajectory(root)`` joins them."""
    require_initialised("rank_trajectory_store")
    return rank_store_path(root, dist.get_rank(group), dist.get_world_size(group))
