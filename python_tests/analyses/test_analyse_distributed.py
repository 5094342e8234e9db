"""``analyse`` over 2 and 3 gloo processes on CPU (spawned here), each holding a shard of the samples:
every stage's numbers, eigenvectors, profiles and surface equal one process's on the union; rank 0
alone writes the cache; a resumed run reads a stage back only when every rank finds it; one rank's
empty shard is the same clear error on every rank."""
import os
import shutil
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import landscape_kernels as lk
from landscape_kernels.reproduce.torchrun import exit_past_teardown

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")

N = 41
SETTINGS = dict(top_k=3, tol=1e-10, density_probes=2, density_steps=12, trace_products=12, frobenius_probes=4,
                layer_steps=20, profile_points=5, surface_points=3, random_directions=2)


def _problem():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.8)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def _analyse(data, **kw):
    model, _, _ = _problem()
    return lk.analyse(model, F.cross_entropy, data, batch_size=6, settings=lk.AnalyseSettings(**SETTINGS), **kw)


def _worker(rank, world, init_file, bounds, out_dir, resume, cache_per_rank):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        _, x, y = _problem()
        lo, hi = bounds[rank], bounds[rank + 1]
        try:
            cache = os.path.join(out_dir, f"cache{rank}" if cache_per_rank else "cache")
            result = _analyse((x[lo:hi], y[lo:hi]), cache_dir=cache, resume=resume)
            out = {"summary": result.to_dict(), "arrays": result.arrays}
        except ValueError as exc:
            out = {"error": str(exc)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_past_teardown()  # the result is saved; a normal exit can abort in gloo's teardown


def _spawn(tmp_path, bounds, resume=False, cache_per_rank=False):
    world = len(bounds) - 1
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), bounds, str(tmp_path), resume, cache_per_rank), nprocs=world,
             join=True)
    (tmp_path / "init").unlink(missing_ok=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_same_numbers(got, want, path="", rtol=1e-7, atol=1e-10):
    if isinstance(want, dict):
        assert set(got) == set(want), (path, sorted(set(got) ^ set(want)))
        for k in want:
            _assert_same_numbers(got[k], want[k], f"{path}.{k}", rtol, atol)
    elif isinstance(want, (list, tuple)) and want and not isinstance(want[0], str):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_numbers(a, b, f"{path}[{i}]", rtol, atol)
    elif isinstance(want, float):
        assert np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True), (path, got, want)
    else:
        assert got == want, (path, got, want)


TIMED = ("method", "seconds_per_point")  # how auto evaluated the landscape points: this run's timings


def _untimed(stages):
    return {st: {k: v for k, v in r.items() if k not in TIMED} for st, r in stages.items()}


@pytest.fixture(scope="module")
def one_process():
    _, x, y = _problem()
    return _analyse((x, y))


@pytest.mark.parametrize("bounds", [[0, 17, N], [0, 5, 30, N]], ids=["2 ranks", "3 ranks"])
def test_every_stage_over_ranks_equals_one_process_on_the_union(tmp_path, bounds, one_process):
    want = one_process.to_dict()
    results = _spawn(tmp_path, bounds)
    rank0 = {st: [results[0]["summary"]["stages"][st][k] for k in TIMED] for st in ("profiles", "surface")}
    for rank, got in enumerate(results):
        assert "error" not in got, got.get("error")
        summary = got["summary"]
        assert summary.pop("ranks") == len(bounds) - 1 and want["ranks"] == 1
        assert summary["num_samples"] == N
        summary.pop("timings_s")
        for stage in ("profiles", "surface"):  # every rank made rank 0's choice, from the slowest rank's times
            timed = [summary["stages"][stage][k] for k in TIMED]
            assert timed == rank0[stage] and timed[0] in ("batched", "loop") and set(timed[1]) == {"batched", "loop"}
        summary["stages"] = _untimed(summary["stages"])
        _assert_same_numbers(summary, {**{k: v for k, v in want.items() if k not in ("ranks", "timings_s")},
                                       "stages": _untimed(want["stages"])})
        # the arrays the figures are drawn from: eigenvectors up to sign, the rest as they are
        for key, value in one_process.arrays.items():
            a, b = np.asarray(got["arrays"][key]), np.asarray(value)
            if key.endswith("_eigenvectors"):
                a = a * np.sign((a * b).sum(1, keepdims=True))
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"rank {rank}: {key}")
    # rank 0 alone wrote the cache; every stage is there
    stages = lk.training.state_files.read_json(tmp_path / "cache" / "stages.json")
    assert set(stages) == set(want["stages"])


def test_a_resumed_run_over_ranks_reads_back_what_every_rank_finds(tmp_path):
    first = _spawn(tmp_path, [0, 20, N])
    for rank in (0, 1):  # each rank reads its own copy (ranks on machines without a shared disk) ...
        shutil.copytree(tmp_path / "cache", tmp_path / f"cache{rank}")
    os.remove(tmp_path / "cache1" / "surface.npz")  # ... and rank 1 lacks one stage: it runs again, on every rank
    again = _spawn(tmp_path, [0, 20, N], resume=True, cache_per_rank=True)
    for a, b in zip(first, again):
        timings = b["summary"]["timings_s"]
        assert timings["surface"] > 0 and all(t == 0.0 for s, t in timings.items() if s != "surface")
        _assert_same_numbers(_untimed(b["summary"]["stages"]), _untimed(a["summary"]["stages"]), rtol=1e-12, atol=0)
        assert {s: r for s, r in b["summary"]["stages"].items() if s != "surface"} == \
            {s: r for s, r in a["summary"]["stages"].items() if s != "surface"}  # read back as written


def test_an_empty_shard_is_one_clear_error_on_every_rank(tmp_path):
    results = _spawn(tmp_path, [0, 20, 20, N])
    assert "rank 1" in results[1]["error"] and "no samples" in results[1]["error"]
    for r in (0, 2):
        assert "rank(s) [1]" in results[r]["error"]


def test_distributed_true_outside_a_process_group_says_so():
    _, x, y = _problem()
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        _analyse((x, y), distributed=True)
