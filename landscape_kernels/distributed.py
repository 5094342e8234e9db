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

Parameter-sharded trajectories: each rank records its slice of theta with a ``TrajectoryRecorder`` into
``rank_trajectory_store(root)``; ``sharded_pca`` analyses them in the group, and
``sharded_trajectory.open_sharded_trajectory(root)`` reopens all ranks' stores together afterwards.

Launch with ``torchrun --nproc_per_node R script.py`` (see the README recipe).
"""
import torch
import torch.distributed as dist

from .operators import NoiseCovarianceOperator, Operator
from .sharded_trajectory import rank_store_path


def _all_reduce(t, group):
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as exc:  # gloo / NCCL raise a RuntimeError subclass when the group's timeout passes
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise RuntimeError(
                f"landscape_kernels.distributed: rank {dist.get_rank(group)} waited for the other ranks longer than the "
                "process group's timeout; every rank must make the same calls (the same products, in the same order, "
                "with the same seeds) and none may have stopped. Original error: " + str(exc)) from exc
        raise
    return t


def _require_initialised(name):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "(e.g. under torchrun) first")


def _per_rank(values, group):
    """(world, len(values)) float64 table of every rank's ``values`` (one all-reduce of a one-hot layout)."""
    table = torch.zeros(dist.get_world_size(group), len(values), dtype=torch.float64)
    table[dist.get_rank(group)] = torch.tensor(values, dtype=torch.float64)
    return _all_reduce(table, group)


class DistributedOperator(Operator):
    """The operator of the union of every rank's data shard.

    Args:
        build: a callable ``data -> operator`` (e.g. ``lambda d: HessianOperator(model, loss_fn, d)``)
            called with this rank's ``data``; ranks whose shard is empty are found before anything is
            built, and every rank then raises the same error (no rank is left waiting in a collective).
        data: this rank's shard, an (inputs, targets) pair of tensors.
        group: the process group (default: the world).
        sgd_batch_size, without_replacement: for a noise covariance, the SGD scaling of
            ``NoiseCovarianceOperator`` applied with the global N (build the local operator without it).
    """

    def __init__(self, build, data, group=None, sgd_batch_size=None, without_replacement=False):
        _require_initialised("DistributedOperator")
        self.group = group
        x = data[0]
        counts = _per_rank([x.shape[0]], group)[:, 0]  # every rank learns every shard size
        empty = [r for r, n in enumerate(counts.tolist()) if n == 0]
        if empty:
            raise ValueError(f"DistributedOperator: the data shard of rank(s) {empty} is empty; every rank needs "
                             f"at least one sample (shard sizes {[int(n) for n in counts.tolist()]})")
        self.local_samples, self.num_samples = int(x.shape[0]), int(counts.sum())
        self.op = build(data)
        self.shape, self.dtype, self.device = self.op.shape, self.op.dtype, self.op.device
        self.column_chunk = None  # the local operator chunks its own columns
        self.centred = isinstance(self.op, NoiseCovarianceOperator) and self.op.centred
        if isinstance(self.op, NoiseCovarianceOperator) and self.op.scale != 1.0:
            raise ValueError("DistributedOperator: build the local noise covariance without sgd_batch_size and pass "
                             "sgd_batch_size to DistributedOperator, which scales with the global N")
        self.scale = 1.0
        if sgd_batch_size is not None:
            if not isinstance(self.op, NoiseCovarianceOperator):
                raise ValueError("DistributedOperator: sgd_batch_size applies to a noise covariance only")
            N = self.num_samples
            if not isinstance(sgd_batch_size, int) or not 1 <= sgd_batch_size <= N:
                raise ValueError(f"sgd_batch_size must be an int in [1, N = {N}], got {sgd_batch_size!r}")
            self.scale = 1.0 / sgd_batch_size
            if without_replacement:
                self.scale *= (N - sgd_batch_size) / max(N - 1, 1)
        self.mean_gradient = None
        if self.centred:
            local = self.op.mean_gradient() * self.local_samples
            self.mean_gradient = _all_reduce(local, group) / self.num_samples

    def _matmat(self, V):
        weight = self.local_samples / self.num_samples
        if self.centred:  # the uncentred local moment, centred with the global mean afterwards
            out = _all_reduce(self.op.second_moment_matmat(V) * weight, self.group)
            g = self.mean_gradient
            out = out - torch.outer(g, g @ V)
        else:
            out = _all_reduce(self.op.matmat(V) * weight, self.group)
        return out * self.scale


def distributed_moments(ps, group=None):
    """(N, mean, variance) of the per-sample gradients over the union of every rank's batch, from a
    ``PerSampleGradients`` that has recorded this rank's batch: dicts name -> tensor in the parameter's
    shape, the population variance (SPEC's C_1 diagonal), combined by Chan's merge of the per-rank
    means and variances (two all-reduces of 2P + 1 numbers), never of the per-sample gradients."""
    _require_initialised("distributed_moments")
    names = ps.param_names
    local_mean, local_var = ps.mean(), ps.variance()
    n = float(ps.batch_size)
    flat_mean = torch.cat([local_mean[k].reshape(-1) for k in names]).double()
    flat_var = torch.cat([local_var[k].reshape(-1) for k in names]).double()
    head = torch.cat([flat_mean.new_tensor([n]), flat_mean * n])
    _all_reduce(head, group)
    N = head[0]
    mean = head[1:] / N
    m2 = flat_var * n + n * (flat_mean - mean).square()  # this rank's sum of squares about the global mean
    _all_reduce(m2, group)
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


def _all_gather_rows(t, sizes, group):
    """Concatenate every rank's ``t`` (rows = its batch, the other dims equal) in rank order."""
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def distributed_gram(ps, group=None):
    """(N, N) Gram matrix <g_i, g_j> of the per-sample gradients over the union of every rank's batch
    (rows in rank order), the same on every rank. The per-sample factors of all ranks are gathered
    (memory: every rank holds all of them, the size of the layers' inputs and output gradients, never
    N x P), then the fused Gram kernel runs on the union. The non-batch shapes (e.g. the sequence
    length) must agree across ranks."""
    from . import ops

    _require_initialised("distributed_gram")
    factors = ps.factors()
    shapes = _per_rank([ps.batch_size] + [d for _, A, D in factors for d in (*A.shape, *D.shape)], group)
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
        part = ops.per_sample_gram(_all_gather_rows(A, sizes, group), _all_gather_rows(D, sizes, group),
                                   check_finite=False)
        gram = part if gram is None else gram + part
    return gram


def sharded_pca(X, n_components=None, group=None):
    """PCA of a trajectory whose parameters are sharded across ranks (each rank records its slice of
    theta, as under FSDP): ``X`` is this rank's (T, N_r) block of the same T snapshots on every rank.
    The T x T Gram matrix of the centred snapshots is all-reduced (one collective of T^2 numbers); its
    eigendecomposition, the same on every rank, gives the variances (sample covariance, divided by
    T - 1, as ``StreamingPCA``) and each rank's columns of the components, which stay sharded.

    Returns (explained_variance (k,), components (k, N_r) of this rank, mean (N_r,)), float64, with
    StreamingPCA's sign rule (each component's entry of largest magnitude, over all ranks, positive)."""
    _require_initialised("sharded_pca")
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"sharded_pca: X must be a (T, N_r) tensor, got {getattr(X, 'shape', type(X).__name__)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T = X.shape[0]
    counts = _per_rank([T], group)[:, 0]
    if not bool((counts == T).all()):
        raise ValueError(f"sharded_pca: every rank needs the same snapshots; snapshot counts per rank "
                         f"{[int(c) for c in counts.tolist()]}")
    if T < 2:
        raise ValueError(f"sharded_pca: needs at least 2 snapshots, got {T}")
    mean = X.double().mean(0)
    Xc = X.double() - mean
    G = _all_reduce(Xc @ Xc.T, group)
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
    _all_reduce(best, group)
    signs = best[best[:, :, 0].argmax(0), torch.arange(k), 1]
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    return evals[:k] / (T - 1), components, mean


def rank_trajectory_store(root, group=None):
    """This rank's trajectory store directory under ``root`` (pass it as ``TrajectoryRecorder(store=...)``);
    every rank records its own slice of theta, and ``open_sharded_trajectory(root)`` joins them."""
    _require_initialised("rank_trajectory_store")
    return rank_store_path(root, dist.get_rank(group), dist.get_world_size(group))
