"""SSGD and DPSGD (Zhang et al., arXiv 2112.01433): the mixing matrices, one step against a dense
per-learner computation, DPSGD on the complete graph against SSGD, the effective learning rate on a
quadratic where it is known, and the one-process simulation against 2 and 3 spawned gloo ranks."""
import copy
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from landscape_kernels.reproduce.torchrun import exit_past_teardown
from landscape_kernels.training.decentralized import (
    BatchSchedule, DistributedLearner, SimulatedLearners, effective_lr, mixing_matrix, neighbours, shard_bounds,
    spread_alignment)
from testing import small_mlp


def _problem(seed=0, n_samples=48):
    model = small_mlp((5, 7, 3), activation=nn.Tanh, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_samples,), generator=g)
    return model, x, y


@pytest.mark.parametrize("topology", ["ring", "complete", "exponential"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
def test_mixing_matrices_are_doubly_stochastic_and_symmetric(topology, n):
    W = mixing_matrix(n, topology)
    assert torch.allclose(W.sum(0), torch.ones(n, dtype=W.dtype)) and torch.allclose(W.sum(1), torch.ones(n, dtype=W.dtype))
    assert torch.equal(W, W.T) and bool((W >= 0).all())
    eig = torch.linalg.eigvalsh(W)
    assert abs(float(eig[-1]) - 1) < 1e-12  # the average is kept


def test_the_graphs():
    assert neighbours(5, "ring") == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    assert neighbours(2, "ring") == [[1], [0]]
    assert neighbours(8, "exponential")[0] == [1, 2, 4, 6, 7]
    ring = mixing_matrix(5)
    assert float(ring[0, 0]) == float(ring[0, 1]) == float(ring[0, 4]) == pytest.approx(1 / 3) and float(ring[0, 2]) == 0
    assert torch.allclose(mixing_matrix(4, "complete"), torch.full((4, 4), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="topology must be one of"):
        neighbours(4, "star")


def test_shards_and_batches():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 9)]
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_bounds(2, 3)
    s = BatchSchedule(10, 4, seed=1, learner=2)
    first = [s.next() for _ in range(2)]  # 2 batches per epoch, the 2 left over dropped
    assert len(set(torch.cat(first).tolist())) == 8
    state = s.state()
    after = [s.next() for _ in range(3)]
    s.load(state)
    assert all(torch.equal(a, s.next()) for a in after)  # resumes where it was
    with pytest.raises(ValueError, match="batch_size must be in"):
        BatchSchedule(3, 4, seed=0, learner=0)


def _per_learner_gradients(model, x, y, W, batches):
    """Each learner's gradient by plain autograd on a copy of the model loaded with its replica."""
    out = []
    for w, i in zip(W, batches):
        m = copy.deepcopy(model)
        params = list(m.parameters())
        with torch.no_grad():
            for p, c in zip(params, torch.split(w, [q.numel() for q in params])):
                p.copy_(c.view_as(p))
        m.zero_grad()
        F.cross_entropy(m(x[i]), y[i]).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(out)


@pytest.mark.parametrize("algorithm,combine", [("ssgd", "before"), ("dpsgd", "before"), ("dpsgd", "after")])
def test_one_step_is_the_dense_mixing_and_gradient_step(algorithm, combine):
    model, x, y = _problem()
    sim = SimulatedLearners(model, F.cross_entropy, x, y, num_learners=4, batch_size=5, lr=0.3, algorithm=algorithm,
                            combine=combine, seed=3)
    sim.step()  # the replicas differ from here on (DPSGD)
    W = sim.W.clone()
    probe = [BatchSchedule(12, 5, 3, j) for j in range(4)]
    for s in probe:
        s.next()
    batches = [b0 + s.next() for s, (b0, _) in zip(probe, sim.bounds)]
    G = _per_learner_gradients(model, x, y, W, batches)
    M = mixing_matrix(4)
    expect = {"ssgd": W - 0.3 * G.mean(0), "before": M @ W - 0.3 * G, "after": M @ (W - 0.3 * G)}
    sim.step()
    assert torch.allclose(sim.W, expect["ssgd" if algorithm == "ssgd" else combine], atol=1e-13)


def test_dpsgd_on_the_complete_graph_is_ssgd():
    model, x, y = _problem()
    runs = {name: SimulatedLearners(model, F.cross_entropy, x, y, 4, 5, 0.3, algorithm=a, topology="complete",
                                    combine=c, seed=1)
            for name, a, c in (("ssgd", "ssgd", "before"), ("after", "dpsgd", "after"), ("before", "dpsgd", "before"))}
    for k in range(6):
        out = {name: r.step() for name, r in runs.items()}
        assert torch.allclose(runs["after"].W, runs["ssgd"].W, atol=1e-13)
        assert out["after"]["spread"] < 1e-25  # the replicas stay equal
        if k == 0:  # mixing before the step: the first averaged step is SSGD's, the replicas then spread
            assert torch.allclose(runs["before"].average(), runs["ssgd"].average(), atol=1e-13)
    assert runs["before"].step()["spread"] > 1e-6


def test_effective_lr_on_a_quadratic_where_it_is_known(gen):
    """Linear least squares (a quadratic in w), full-batch shards: g_j(w) = H_j w - b_j, so
    α_e / α - 1 = (Σ_j H_j δ_j) · g(w_a) / |g(w_a)|² with δ_j = w_j - w_a; identical shards give α_e = α."""
    n, d, per = 3, 4, 6
    x = torch.randn(n * per, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n * per, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    loss = lambda out, target: 0.5 * (out.squeeze(-1) - target).pow(2).mean()  # noqa: E731
    sim = SimulatedLearners(model, loss, x, y, n, per, lr=0.05, seed=0)
    sim.step()
    W = sim.W.clone()
    w_a = W.mean(0)
    H = [x[j * per:(j + 1) * per].T @ x[j * per:(j + 1) * per] / per for j in range(n)]
    b = [x[j * per:(j + 1) * per].T @ y[j * per:(j + 1) * per] / per for j in range(n)]
    g_a = sum(Hj @ w_a - bj for Hj, bj in zip(H, b)) / n
    known = 0.05 * (1 + float(sum(Hj @ (W[j] - w_a) for j, Hj in enumerate(H)) / n @ g_a) / float(g_a @ g_a))
    assert sim.step()["effective_lr"] == pytest.approx(known, rel=1e-10)
    assert known != pytest.approx(0.05, rel=1e-3)  # the replicas' spread changes it here
    same = SimulatedLearners(model, loss, x[:per].repeat(n, 1), y[:per].repeat(n), n, per, lr=0.05, seed=0)
    same.W = same.W + torch.randn(same.W.shape, generator=gen, dtype=torch.float64)
    assert same.step()["effective_lr"] == pytest.approx(0.05, rel=1e-12)
    assert effective_lr(0.1, torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.2)


def test_spread_alignment(gen):
    E = torch.linalg.qr(torch.randn(10, 2, generator=gen, dtype=torch.float64)).Q
    inside = torch.randn(5, 2, generator=gen, dtype=torch.float64) @ E.T
    assert spread_alignment(inside, E) == pytest.approx(1.0)
    outside = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    outside = outside - outside @ E @ E.T
    assert spread_alignment(outside, E) == pytest.approx(0.0, abs=1e-14)


def test_bad_settings_and_models():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        SimulatedLearners(model, F.cross_entropy, x, y, 4, 5, 0.1, algorithm="adam")
    with pytest.raises(ValueError, match="combine must be one of"):
        SimulatedLearners(model, F.cross_entropy, x, y, 4, 5, 0.1, combine="during")
    with pytest.raises(ValueError, match="lr must be positive"):
        SimulatedLearners(model, F.cross_entropy, x, y, 4, 5, -0.1)
    with pytest.raises(ValueError, match="has buffers"):
        SimulatedLearners(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), F.cross_entropy, x.float(), y, 4, 5, 0.1)
    with pytest.raises(ValueError, match="needs an initialised process group"):
        DistributedLearner(model, F.cross_entropy, x, y, 5, 0.1)


# ----------------------------------------------------------------------------- real gloo ranks
STEPS = 5


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        for algorithm, topology, combine in (("ssgd", "ring", "before"), ("dpsgd", "ring", "before"),
                                             ("dpsgd", "ring", "after")):
            model, x, y = _problem()
            learner = DistributedLearner(model, F.cross_entropy, x, y, 4, 0.4, algorithm, topology, combine, seed=2)
            out[f"{algorithm}-{combine}-steps"] = [learner.step() for _ in range(STEPS)]
            out[f"{algorithm}-{combine}"] = learner.replicas()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_past_teardown()  # the result is saved; a normal exit can abort in gloo's teardown


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")
@pytest.mark.parametrize("world", [2, 3], ids=["2 ranks", "3 ranks"])
def test_simulation_equals_spawned_gloo_ranks(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for algorithm, combine in (("ssgd", "before"), ("dpsgd", "before"), ("dpsgd", "after")):
        model, x, y = _problem()
        sim = SimulatedLearners(model, F.cross_entropy, x, y, world, 4, 0.4, algorithm, "ring", combine, seed=2)
        measured = [sim.step() for _ in range(STEPS)]
        got = ranks[0][f"{algorithm}-{combine}"]
        assert all(torch.equal(r[f"{algorithm}-{combine}"], got) for r in ranks)  # every rank gathered the same
        for rank in ranks:  # the measurements too, on every rank
            for mine, theirs in zip(measured, rank[f"{algorithm}-{combine}-steps"]):
                assert mine.keys() == theirs.keys()
                for key in mine:
                    assert theirs[key] == pytest.approx(mine[key], rel=1e-9, abs=1e-12), key
        assert torch.allclose(got, sim.W, atol=1e-12), (algorithm, combine, float((got - sim.W).abs().max()))
        if (algorithm, combine) == ("dpsgd", "before"):  # the replicas differ: the exchange is exercised (2 ranks "after" is SSGD)
            assert float((got[0] - got[1]).abs().max()) > 1e-6
