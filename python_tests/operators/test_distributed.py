"""DistributedOperator with 2 and 3 gloo processes on CPU (spawned here): the products, top-5 Hessian
eigenvalues, noise-covariance spectrum, SLQ density and trace estimates equal one process's on the union
of the shards."""
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from landscape_kernels import HessianOperator
from landscape_kernels.linalg.density import spectral_density
from landscape_kernels.linalg.lanczos import lanczos_eigs
from landscape_kernels.linalg.traces import hutchinson_trace, hutchpp_trace
from landscape_kernels.operators.noise import FisherOperator, NoiseCovarianceOperator
from landscape_kernels.reproduce.torchrun import exit_past_teardown

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    x = torch.randn(37, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (37,), generator=g)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, generator=g, dtype=torch.float64)
    return model, x, y, V


def _results(H, C, V):
    """Products, eigenvalues, the SLQ density and the trace estimators: unchanged code on either operator."""
    density = spectral_density(H, num_probes=3, num_steps=12, seed=0)
    return {"H_V": H.matmat(V), "C_V": C.matmat(V),
            "H_top5": lanczos_eigs(H, 5, tol=1e-12, seed=0).eigenvalues,
            "C_top5": lanczos_eigs(C, 5, tol=1e-12, seed=0).eigenvalues,
            "H_slq_nodes": density.nodes, "H_slq_weights": density.weights,
            "H_hutchpp": torch.tensor(hutchpp_trace(H, num_products=12, seed=0)),
            "C_hutchinson": torch.tensor(hutchinson_trace(C, num_probes=6, seed=0))}


def _moments(model, data, distributed=False):
    from landscape_kernels import PerSampleGradients
    from landscape_kernels.capture.distributed import distributed_gram, distributed_moments

    ps = PerSampleGradients(model)
    with ps:
        F.cross_entropy(model(data[0]), data[1]).backward()
    model.zero_grad(set_to_none=True)
    if distributed:
        (n, mean, var), gram = distributed_moments(ps), distributed_gram(ps)
    else:
        n, mean, var, gram = ps.batch_size, ps.mean(), ps.variance(), ps.gram()
    return {"n": n, "mean": torch.cat([m.reshape(-1) for m in mean.values()]),
            "variance": torch.cat([v.reshape(-1) for v in var.values()]), "gram": gram}


def _trajectory():
    g = torch.Generator().manual_seed(5)
    scales = torch.logspace(0, -3, 23, dtype=torch.float64)
    return 3.0 + torch.randn(30, 23, generator=g, dtype=torch.float64) * scales  # 30 snapshots, 23 parameters


def _pca(rank, world, out_dir):
    """Each rank records its columns of the trajectory into its own store, then sharded_pca runs on them."""
    from landscape_kernels import TrajectoryRecorder
    from landscape_kernels.trajectory.distributed import rank_trajectory_store, sharded_pca

    cols = torch.tensor_split(torch.arange(23), [4, 13] if world == 3 else [9])[rank]
    source = {"shard": torch.zeros(len(cols), dtype=torch.float64)}
    with TrajectoryRecorder(source, store=rank_trajectory_store(os.path.join(out_dir, "traj")), dtype=torch.float64,
                            chunk_size=7) as recorder:
        for step, theta in enumerate(_trajectory()):
            source["shard"] = theta[cols]
            recorder.record(step)
    var, comps, mean = sharded_pca(recorder.snapshots(), n_components=6)
    return {"pca_var": var, "pca_comps": comps, "pca_mean": mean, "pca_cols": cols}


def _worker(rank, world, init_file, bounds, out_dir):
    from landscape_kernels.operators.distributed import DistributedOperator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model, x, y, V = _problem()
        shard = (x[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]])
        try:
            H = DistributedOperator(lambda d: HessianOperator(model, F.cross_entropy, d, batch_size=5), shard)
            C = DistributedOperator(lambda d: NoiseCovarianceOperator(model, F.cross_entropy, d, batch_size=5), shard,
                                    sgd_batch_size=4, without_replacement=True)
            F_ = DistributedOperator(lambda d: FisherOperator(model, F.cross_entropy, d), shard)
            lean = DistributedOperator(lambda d: NoiseCovarianceOperator(model, F.cross_entropy, d, batch_size=5,
                                                                         keep_factors=False), shard)
            out = {**_results(H, C, V), "F_V": F_.matmat(V), "C1_V": lean.matmat(V), **_moments(model, shard, distributed=True),
                   **_pca(rank, world, out_dir)}
        except ValueError as exc:
            out = {"error": str(exc)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_past_teardown()  # the result is saved; a normal exit can abort in gloo's teardown


def _spawn(tmp_path, bounds):
    world = len(bounds) - 1
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), bounds, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("bounds", [[0, 11, 37], [0, 5, 18, 37]], ids=["2 ranks", "3 ranks"])
def test_distributed_operators_equal_one_process_on_the_union(tmp_path, bounds):
    model, x, y, V = _problem()
    H = HessianOperator(model, F.cross_entropy, (x, y), batch_size=5)
    C = NoiseCovarianceOperator(model, F.cross_entropy, (x, y), batch_size=5, sgd_batch_size=4, without_replacement=True)
    want = {**_results(H, C, V), "F_V": FisherOperator(model, F.cross_entropy, (x, y)).matmat(V),
            "C1_V": NoiseCovarianceOperator(model, F.cross_entropy, (x, y)).matmat(V),
            **_moments(model, (x, y))}
    from landscape_kernels.trajectory.pca import StreamingPCA

    pca = StreamingPCA(n_components=6, mode="exact").fit(_trajectory())
    results = _spawn(tmp_path, bounds)
    from landscape_kernels import open_sharded_trajectory

    joined = open_sharded_trajectory(tmp_path / "traj")  # the per-rank stores read as one trajectory
    assert joined.world_size == len(bounds) - 1 and joined.steps.tolist() == list(range(30))
    torch.testing.assert_close(joined.snapshots(), _trajectory(), rtol=0, atol=0)
    for got in results:
        assert "error" not in got, got.get("error")
        assert got.pop("n") == want["n"] == 37
        cols = got.pop("pca_cols")
        torch.testing.assert_close(got.pop("pca_var"), pca.explained_variance_, rtol=1e-8, atol=0)
        torch.testing.assert_close(got.pop("pca_comps"), pca.components_[:, cols], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.pop("pca_mean"), pca.mean_[cols], rtol=1e-12, atol=0)
        for key, value in want.items():
            if key != "n":
                torch.testing.assert_close(got[key], value, rtol=1e-8, atol=1e-12, msg=key)


def test_an_empty_shard_is_one_clear_error_on_every_rank(tmp_path):
    for got in _spawn(tmp_path, [0, 20, 20, 37]):
        assert "rank(s) [1] is empty" in got["error"]


def test_without_an_initialised_group_it_says_so():
    from landscape_kernels.operators.distributed import DistributedOperator

    model, x, y, _ = _problem()
    with pytest.raises(RuntimeError, match="not initialised"):
        DistributedOperator(lambda d: HessianOperator(model, F.cross_entropy, d), (x, y))


def test_the_torchrun_example_gives_one_process_eigenvalues():
    """The README recipe: 2 ranks under torchrun print what 1 rank prints."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "distributed_spectra.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(n):
        out = subprocess.run([torchrun, "--nproc_per_node", str(n), script], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [line for line in out.stdout.splitlines() if line.startswith("top-5")]

    one, two = run(1), run(2)
    assert len(one) == 2 and one == two


def test_noise_covariance_parts_the_distributed_operator_combines():
    model, x, y, V = _problem()
    C = NoiseCovarianceOperator(model, F.cross_entropy, (x, y), batch_size=5)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(C.mean_gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(C.second_moment_matmat(V), FisherOperator(model, F.cross_entropy, (x, y)).matmat(V),
                               rtol=1e-12, atol=1e-14)
    g = C.mean_gradient()
    torch.testing.assert_close(C.matmat(V), C.second_moment_matmat(V) - torch.outer(g, g @ V), rtol=1e-10, atol=1e-13)


def _timeout_worker(rank, world, init_file, out_dir):
    from landscape_kernels.operators.distributed import DistributedOperator

    # Start-up under a generous timeout (a loaded CI machine may start one rank seconds after the other); the
    # operator's own group has the short one the test is about.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    short = dist.new_group(timeout=timedelta(seconds=3))
    model, x, y, V = _problem()
    H = DistributedOperator(lambda d: HessianOperator(model, F.cross_entropy, d), (x[rank::2], y[rank::2]), group=short)
    dist.barrier()  # both ranks have built the operator
    done = os.path.join(out_dir, "rank0.pt")
    if rank == 0:  # rank 1 never makes the product: rank 0 must get a clear error, not hang
        message = ""
        try:
            H.matmat(V)
        except RuntimeError as exc:
            message = str(exc)
        torch.save(message, done + ".part")
        os.replace(done + ".part", done)
    else:  # stay alive (not making the product) until rank 0 has its answer
        import time

        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
    # A group whose collective timed out cannot be torn down cleanly (gloo may abort in its destructor);
    # leave without running it, as a crashed training job would.
    os._exit(0)


def test_a_rank_that_stops_making_products_gives_a_clear_timeout_error(tmp_path):
    mp.spawn(_timeout_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    message = torch.load(tmp_path / "rank0.pt")
    assert "waited for the other ranks longer than the process group's timeout" in message
