"""Parameter-sharded trajectories: per-rank stores written independently (as ranks do) and reopened
together equal one recorder of the full parameter vector; interrupted and mismatched runs."""
import json

import pytest
import torch

from landscape_kernels import StreamingPCA, TrajectoryRecorder, open_sharded_trajectory
from landscape_kernels.trajectory.sharded import rank_store_path
from landscape_kernels.trajectory.store import CorruptChunkError

CUTS = [5, 17]  # three ranks hold theta[:5], theta[5:17], theta[17:] (uneven, as FSDP's flat shards)


def _thetas(steps=11, size=29):
    g = torch.Generator().manual_seed(3)
    return torch.cumsum(torch.randn(steps, size, generator=g, dtype=torch.float64), 0)


def _record_sharded(root, thetas, world=3, chunk_size=4, stop_rank=None, stop_after=None):
    """Each rank's recorder sees only its slice (a dict source, read at every record)."""
    slices = torch.tensor_split(torch.arange(thetas.shape[1]), CUTS if world == 3 else [9])
    for rank, cols in enumerate(slices):
        source = {"flat_shard": thetas[0, cols].clone()}
        rec = TrajectoryRecorder(source, store=rank_store_path(root, rank, world), dtype=torch.float64,
                                 chunk_size=chunk_size)
        for step, theta in enumerate(thetas, 1):
            if rank == stop_rank and step > stop_after:
                break  # killed: its buffered rows are lost, the flushed chunks stay
            source["flat_shard"] = theta[cols].clone()
            rec.record(step)
        if rank != stop_rank:
            rec.close()
    return slices


def test_reopened_together_equals_one_recorder_of_the_full_vector(tmp_path):
    thetas = _thetas()
    source = {"theta": thetas[0]}
    full = TrajectoryRecorder(source, store=None, dtype=torch.float64, chunk_size=4)
    for step, theta in enumerate(thetas, 1):
        source["theta"] = theta
        full.record(step)
    slices = _record_sharded(tmp_path / "traj", thetas)
    traj = open_sharded_trajectory(tmp_path / "traj")
    assert traj.world_size == 3 and traj.rank_sizes == [5, 12, 12] and traj.num_params == 29
    torch.testing.assert_close(traj.snapshots(), full.snapshots(), rtol=0, atol=0)
    assert traj.steps.tolist() == list(range(1, 12)) == full.steps.tolist()
    torch.testing.assert_close(traj.snapshots(last=3), thetas[-3:], rtol=0, atol=0)
    torch.testing.assert_close(traj.rank_snapshots(1), thetas[:, slices[1]], rtol=0, atol=0)
    assert list(traj.unflatten(thetas[4])) == ["rank0/flat_shard", "rank1/flat_shard", "rank2/flat_shard"]
    torch.testing.assert_close(traj.unflatten(thetas[4])["rank2/flat_shard"], thetas[4, slices[2]])
    # a consumer of chunks sees the full theta: streaming PCA equals PCA of the joined matrix
    pca = StreamingPCA(n_components=4, mode="exact")
    for _, X in traj.chunks():
        pca.partial_fit(X)
    ref = StreamingPCA(n_components=4, mode="exact").fit(thetas)
    torch.testing.assert_close(pca.explained_variance_, ref.explained_variance_, rtol=1e-10, atol=0)


def test_an_interrupted_rank_leaves_the_common_chunks_readable(tmp_path):
    thetas = _thetas()
    _record_sharded(tmp_path / "traj", thetas, stop_rank=1, stop_after=6)  # rank 1 flushed 1 chunk, the others 3
    with pytest.warns(RuntimeWarning, match=r"ranks hold \[3, 1, 3\] chunks"):
        traj = open_sharded_trajectory(tmp_path / "traj")
    assert traj.num_chunks == 1
    torch.testing.assert_close(traj.snapshots(), thetas[:4], rtol=0, atol=0)
    assert (tmp_path / "traj" / "rank_00000" / "chunk_000002.npz").exists()  # nothing recorded is deleted


def test_mismatched_runs_are_clear_errors(tmp_path):
    thetas = _thetas()
    _record_sharded(tmp_path / "a", thetas)
    with pytest.raises(ValueError, match="holds a trajectory of 3 ranks, this run has 2"):
        rank_store_path(tmp_path / "a", 0, 2)
    with pytest.raises(ValueError, match="rank"):
        rank_store_path(tmp_path / "a", 3, 3)
    # rank 2 recorded other steps
    rec = TrajectoryRecorder({"flat_shard": torch.zeros(12, dtype=torch.float64)}, dtype=torch.float64, chunk_size=4,
                             store=rank_store_path(tmp_path / "b", 2, 3))
    for step in range(2, 24, 2):
        rec.record(step)
    rec.close()
    for rank in (0, 1):
        rec = TrajectoryRecorder({"flat_shard": torch.zeros(12 if rank else 5, dtype=torch.float64)},
                                 dtype=torch.float64, chunk_size=4, store=rank_store_path(tmp_path / "b", rank, 3))
        for step in range(1, 12):
            rec.record(step)
        rec.close()
    with pytest.raises(CorruptChunkError, match="chunk 0 of rank 2"):
        open_sharded_trajectory(tmp_path / "b").snapshots()
    # a missing rank, a missing root, different dtypes
    import shutil

    shutil.rmtree(tmp_path / "a" / "rank_00001")
    with pytest.raises(FileNotFoundError, match="rank 1 of 3 has no store"):
        open_sharded_trajectory(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="missing sharded.json"):
        open_sharded_trajectory(tmp_path / "nothing")
    for rank in range(2):
        TrajectoryRecorder({"w": torch.zeros(3)}, dtype=torch.float64 if rank else torch.float32,
                           store=rank_store_path(tmp_path / "c", rank, 2)).close()
    with pytest.raises(ValueError, match="differ in dtype"):
        open_sharded_trajectory(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sharded.json").write_text(json.dumps({"format": "other", "world_size": 1}))
    with pytest.raises(ValueError, match="not a landscape_kernels sharded trajectory"):
        open_sharded_trajectory(tmp_path / "d")
