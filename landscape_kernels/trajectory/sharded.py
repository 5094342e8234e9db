"""Trajectories recorded with parameter-sharded snapshots: one store per rank, reopened together.

Under FSDP-style sharding each rank holds a slice of theta, so each rank records its slice with its own
``TrajectoryRecorder`` into ``ROOT/rank_00000``, ``ROOT/rank_00001``, ... (``rank_store_path``, or
``trajectory.distributed.rank_trajectory_store`` inside a process group). ``ROOT/sharded.json`` names the number of
ranks. ``open_sharded_trajectory(ROOT)`` reads them back as one trajectory: the rows of every rank's
chunk i are checked to be the same steps and joined along the parameter axis (rank 0's parameters
first), so ``StreamingPCA`` and the profiles see the full theta; ``rank_chunks(r)`` gives one rank's
columns alone (for ``trajectory.distributed.sharded_pca``, or to stay within one rank's memory).

Ranks flush chunks independently, so a run killed mid-way can leave some ranks one chunk ahead. The
reader then uses the chunks every rank has and warns; the extra chunks stay on disk untouched.
"""
import json
import os
import warnings

import torch

from .store import DTYPES, FORMAT, CorruptChunkError, open_trajectory

SHARDED_FORMAT = FORMAT + ".sharded"


def _manifest_path(root):
    return os.path.join(os.fspath(root), "sharded.json")


def rank_store_path(root, rank, world_size):
    """This rank's store directory under ``root`` (``root/rank_RRRRR``), after recording the world size
    in ``root/sharded.json`` (every rank writes the same file atomically; a different world size already
    recorded there is an error, so two runs cannot mix in one root)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank_store_path: need ints 0 <= rank < world_size, got rank {rank!r}, world_size {world_size!r}")
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    manifest = _manifest_path(root)
    if os.path.exists(manifest):
        with open(manifest) as f:
            stored = json.load(f).get("world_size")
        if stored != world_size:
            raise ValueError(f"rank_store_path: {root!r} holds a trajectory of {stored} ranks, this run has "
                             f"{world_size}; use another root")
    else:
        tmp = f"{manifest}.{rank}.tmp"
        with open(tmp, "w") as f:
            json.dump({"format": SHARDED_FORMAT, "world_size": world_size}, f)
        os.replace(tmp, manifest)
    return os.path.join(root, f"rank_{rank:05d}")


class ShardedTrajectory:
    """Read-only view of the per-rank stores under ``root`` as one trajectory (see the module docstring).

    Attributes: ``world_size``, ``layouts`` (each rank's store layout), ``rank_sizes`` (parameters per
    rank), ``num_params``, ``names`` (``"rank{r}/{name}"``), ``shapes``, ``sizes``, ``num_chunks``.
    """

    def __init__(self, root):
        self.root = os.fspath(root)
        manifest = _manifest_path(self.root)
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"open_sharded_trajectory: no sharded trajectory at {self.root!r} (missing sharded.json)")
        with open(manifest) as f:
            meta = json.load(f)
        if meta.get("format") != SHARDED_FORMAT:
            raise ValueError(f"{manifest}: not a landscape_kernels sharded trajectory")
        self.world_size = int(meta["world_size"])
        self.layouts, self._stores = [], []
        for r in range(self.world_size):
            path = os.path.join(self.root, f"rank_{r:05d}")
            if not os.path.exists(os.path.join(path, "trajectory.json")):
                raise FileNotFoundError(f"open_sharded_trajectory: rank {r} of {self.world_size} has no store at {path!r}")
            layout, store = open_trajectory(path)
            self.layouts.append(layout)
            self._stores.append(store)
        for key in ("dtype", "chunk_size", "every"):
            values = [lay[key] for lay in self.layouts]
            if len(set(map(str, values))) > 1:
                raise ValueError(f"open_sharded_trajectory: the ranks' stores differ in {key}: {values}")
        self.dtype = DTYPES[self.layouts[0]["dtype"]]
        counts = [len(s) for s in self._stores]
        self.num_chunks = min(counts)
        if max(counts) > self.num_chunks:
            warnings.warn(f"sharded trajectory {self.root!r}: ranks hold {counts} chunks (an interrupted run); "
                          f"reading the first {self.num_chunks}, which every rank has; the rest stay on disk",
                          RuntimeWarning, stacklevel=3)
        self.names = [f"rank{r}/{n}" for r, lay in enumerate(self.layouts) for n in lay["names"]]
        self.shapes = [tuple(s) for lay in self.layouts for s in lay["shapes"]]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.rank_sizes = [sum(int(torch.Size(s).numel()) for s in lay["shapes"]) for lay in self.layouts]
        self.num_params = sum(self.rank_sizes)

    def rank_chunks(self, rank):
        """Iterate over (steps, snapshots (T_c, N_rank)) of one rank (the chunks every rank has)."""
        if not (isinstance(rank, int) and 0 <= rank < self.world_size):
            raise ValueError(f"ShardedTrajectory: rank must be an int in [0, {self.world_size}), got {rank!r}")
        for i in range(self.num_chunks):
            yield self._stores[rank].read(i)

    def chunks(self):
        """Iterate over (steps (T_c,), snapshots (T_c, N)), every rank's columns joined in rank order."""
        for i in range(self.num_chunks):
            parts = [store.read(i) for store in self._stores]
            steps = parts[0][0]
            for r, (s, _) in enumerate(parts[1:], 1):
                if not torch.equal(s, steps):
                    raise CorruptChunkError(f"sharded trajectory {self.root!r}: chunk {i} of rank {r} holds steps "
                                            f"{s.tolist()[:5]}..., rank 0's holds {steps.tolist()[:5]}...; the ranks "
                                            "did not record the same steps")
            yield steps, torch.cat([x for _, x in parts], 1)

    @property
    def steps(self):
        parts = [s for s, _ in self.rank_chunks(0)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def snapshots(self, last=None):
        """All rows as one (T, N) tensor, or only the ``last`` ones."""
        parts = [x for _, x in self.chunks()]
        X = torch.cat(parts) if parts else torch.empty(0, self.num_params, dtype=self.dtype)
        return X if last is None else X[-last:]

    def rank_snapshots(self, rank, last=None):
        """One rank's (T, N_rank) columns."""
        parts = [x for _, x in self.rank_chunks(rank)]
        X = torch.cat(parts) if parts else torch.empty(0, self.rank_sizes[rank], dtype=self.dtype)
        return X if last is None else X[-last:]

    def unflatten(self, row):
        """A (N,) row to a dict ``"rank{r}/{name}"`` -> tensor of the recorded shapes."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(row, self.sizes), self.shapes)}


def open_sharded_trajectory(root):
    """The per-rank stores under ``root`` as one trajectory (``ShardedTrajectory``)."""
    return ShardedTrajectory(root)
