"""Synchronous and decentralized parallel SGD (Zhang et al., "Loss landscape dependent self-adjusting
learning rates in decentralized stochastic gradient descent", arXiv 2112.01433).

n learners, each with its own shard of the data and its own replica w_j of the model:

- SSGD: w <- w - α (1/n) Σ_j g_j(w): one all-reduce of the gradients per step, every replica equal;
- DPSGD: w_j <- Σ_k W_jk w_k - α g_j(w_j): a mixing step with a doubly stochastic matrix W (a ring by
  default), then the local gradient step taken at the replica's own (pre-mixing) weights (the paper's
  form, ``combine="before"``); or ``combine="after"``: w_j <- Σ_k W_jk (w_k - α g_k(w_k)), each learner
  steps and then averages (with the complete graph that is SSGD exactly).

Two implementations give the same iterates to rounding:

- ``SimulatedLearners``: all n replicas in one process as an (n, P) tensor, the n gradients one
  ``torch.func.vmap``; a grid of settings runs on one machine;
- ``DistributedLearner``: this rank's replica on a real process group (gloo on CPU, NCCL on GPUs, as
  ``torchrun`` starts it): an all-reduce for SSGD, point-to-point exchange with the graph's neighbours
  for DPSGD.

Both draw every learner's minibatches from ``BatchSchedule`` (its shard, its own seeded permutation per
epoch), so the two see the same samples at every step.
"""
import math

import torch
import torch.distributed as dist
from torch.func import functional_call, grad_and_value, vmap

ALGORITHMS = ("ssgd", "dpsgd")
COMBINES = ("before", "after")
TOPOLOGIES = ("ring", "complete", "exponential")


# ----------------------------------------------------------------------------- the graph
def neighbours(n, topology="ring"):
    """Each learner's neighbours (itself excluded) in a symmetric regular graph: ring (j ± 1), complete
    (everyone), exponential (j ± 2^k for 2^k < n)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of learners must be a positive integer, got {n!r}")
    if topology == "complete":
        hops = range(1, n)
    elif topology == "ring":
        hops = (1, -1)
    else:
        hops = [s * 2 ** k for k in range(max(1, math.ceil(math.log2(n)))) if 2 ** k < n for s in (1, -1)]
    return [sorted({(j + h) % n for h in hops} - {j}) for j in range(n)]


def mixing_matrix(n, topology="ring", dtype=torch.float64):
    """The doubly stochastic W = (I + A) / (degree + 1) of the graph (A its adjacency): every learner
    averages itself and its neighbours with equal weights."""
    nbrs = neighbours(n, topology)
    W = torch.zeros(n, n, dtype=dtype)
    for j, ks in enumerate(nbrs):
        W[j, [j, *ks]] = 1.0 / (len(ks) + 1)
    if not (torch.allclose(W.sum(0), torch.ones(n, dtype=dtype)) and torch.allclose(W, W.T)):
        raise ValueError(f"the {topology} graph on {n} learners is not regular; its mixing matrix is not doubly "
                         "stochastic")
    return W


# ----------------------------------------------------------------------------- data
def shard_bounds(num_samples, num_learners):
    """Equal contiguous shards (the last num_samples mod n samples are left out): [(start, stop)]."""
    size = num_samples // num_learners
    if size < 1:
        raise ValueError(f"{num_samples} samples cannot be shared among {num_learners} learners")
    return [(j * size, (j + 1) * size) for j in range(num_learners)]


class BatchSchedule:
    """One learner's minibatches: a fresh seeded permutation of its shard every epoch, cut into batches
    of ``batch_size`` (the incomplete last one dropped, so every step has equal batches)."""

    def __init__(self, shard_size, batch_size, seed, learner):
        if not 1 <= batch_size <= shard_size:
            raise ValueError(f"batch_size must be in [1, {shard_size}] (the shard's size), got {batch_size}")
        self.shard_size, self.batch_size = shard_size, batch_size
        self.generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(learner))
        self.per_epoch = shard_size // batch_size
        self.order, self.position = None, self.per_epoch

    def next(self):
        if self.position == self.per_epoch:
            self.order = torch.randperm(self.shard_size, generator=self.generator)
            self.position = 0
        b = self.position * self.batch_size
        self.position += 1
        return self.order[b : b + self.batch_size]

    def state(self):
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


# ----------------------------------------------------------------------------- the model as a function
class FlatModel:
    """``model`` as a function of one flat parameter vector (its parameters in order); models with
    buffers (BatchNorm's running statistics) are refused: a replica would be more than its weights."""

    def __init__(self, model, loss_fn):
        buffers = [name for name, _ in model.named_buffers()]
        if buffers:
            raise ValueError(f"decentralized SGD: the model has buffers ({', '.join(buffers[:3])}); replicas here are "
                             "parameter vectors only (use a model without BatchNorm running statistics)")
        self.model, self.loss_fn = model, loss_fn
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]

    def flat(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def load(self, w):
        """Copy the flat vector ``w`` into the model's parameters."""
        with torch.no_grad():
            for p, chunk in zip(self.model.parameters(), torch.split(w, self.sizes)):
                p.copy_(chunk.view_as(p))

    def params(self, w):
        return {n: c.view(s) for n, s, c in zip(self.names, self.shapes, torch.split(w, self.sizes))}

    def loss(self, w, x, y):
        return self.loss_fn(functional_call(self.model, self.params(w), (x,)), y)

    def gradients(self, W, X, Y):
        """Per-learner (gradient, loss): W (n, P), X (n, b, ...), Y (n, b, ...)."""
        return vmap(grad_and_value(self.loss))(W, X, Y)


def effective_lr(lr, mean_local_gradient, gradient_at_average):
    """α_e = α (ḡ_DP · g(w_a)) / |g(w_a)|²: the learning rate plain SGD at the averaged weights would need
    to move them, along its own gradient, as far as the replicas' mean gradient does."""
    g = gradient_at_average.reshape(-1)
    return float(lr * (mean_local_gradient.reshape(-1) @ g) / (g @ g).clamp_min(1e-300))


def spread_alignment(deviations, directions):
    """The share of the replicas' spread Σ_j |δ_j|² (δ_j = w_j - w_a, rows of ``deviations``) that lies in
    the span of the orthonormal columns of ``directions`` (P, k); an isotropic spread gives k / P."""
    total = deviations.pow(2).sum()
    if float(total) == 0:
        return float("nan")
    return float((deviations @ directions).pow(2).sum() / total)


def check_settings(algorithm, combine, lr):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")


# ----------------------------------------------------------------------------- one process, n learners
class SimulatedLearners:
    """n learners of SSGD or DPSGD in one process. ``x``, ``y``: the whole training set, split into n
    equal shards (``shard_bounds``); every replica starts from ``model``'s weights.

    ``step()`` makes one step of every learner and returns its measurements: the mean local loss, the
    replicas' spread Σ_j |w_j - w_a|² / n and, for DPSGD, the effective learning rate (the gradient at w_a
    taken on the same minibatches; one more vmap)."""

    def __init__(self, model, loss_fn, x, y, num_learners, batch_size, lr, algorithm="dpsgd", topology="ring",
                 combine="before", seed=0, measure=True):
        check_settings(algorithm, combine, lr)
        self.f = FlatModel(model, loss_fn)
        self.n, self.lr, self.algorithm, self.combine, self.measure = num_learners, float(lr), algorithm, combine, measure
        self.bounds = shard_bounds(x.shape[0], num_learners)
        self.x, self.y = x, y
        w0 = self.f.flat()
        self.mixing = mixing_matrix(num_learners, topology, dtype=w0.dtype)
        self.W = w0.expand(num_learners, -1).clone()
        self.schedules = [BatchSchedule(b1 - b0, batch_size, seed, j) for j, (b0, b1) in enumerate(self.bounds)]
        self.steps = 0

    def batches(self):
        idx = [b0 + s.next() for s, (b0, _) in zip(self.schedules, self.bounds)]
        return torch.stack([self.x[i] for i in idx]), torch.stack([self.y[i] for i in idx])

    def average(self):
        return self.W.mean(0)

    def replicas(self):
        """(n, P): every learner's weights."""
        return self.W

    def step(self):
        X, Y = self.batches()
        G, losses = self.f.gradients(self.W, X, Y)
        out = {"loss": float(losses.mean())}
        if self.algorithm == "ssgd":
            self.W = self.W - self.lr * G.mean(0, keepdim=True)
        else:
            if self.measure:
                w_a = self.average().expand_as(self.W)
                G_a, _ = self.f.gradients(w_a, X, Y)
                out["effective_lr"] = effective_lr(self.lr, G.mean(0), G_a.mean(0))
            if self.combine == "before":
                self.W = self.mixing @ self.W - self.lr * G
            else:
                self.W = self.mixing @ (self.W - self.lr * G)
        if self.measure:
            out["spread"] = float((self.W - self.average()).pow(2).sum(1).mean())
        self.steps += 1
        return out


# ----------------------------------------------------------------------------- one rank of a process group
class DistributedLearner:
    """This rank's learner on the default process group (rank j of n, its shard ``shard_bounds``[j] of
    ``x``, ``y``): the same iterates as ``SimulatedLearners`` to rounding. ``model`` holds the replica."""

    def __init__(self, model, loss_fn, x, y, batch_size, lr, algorithm="dpsgd", topology="ring", combine="before",
                 seed=0, measure=True):
        if not dist.is_initialized():
            raise ValueError("DistributedLearner needs an initialised process group (torchrun, or "
                             "torch.distributed.init_process_group)")
        check_settings(algorithm, combine, lr)
        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self.f = FlatModel(model, loss_fn)
        self.lr, self.algorithm, self.combine, self.measure = float(lr), algorithm, combine, measure
        b0, b1 = shard_bounds(x.shape[0], self.n)[self.rank]
        self.x, self.y = x[b0:b1], y[b0:b1]
        self.schedule = BatchSchedule(b1 - b0, batch_size, seed, self.rank)
        self.neighbours = neighbours(self.n, topology)[self.rank]
        self.weight = 1.0 / (len(self.neighbours) + 1)
        self.steps = 0

    def mean(self, t):
        """The mean over the ranks of ``t`` (an all-reduce)."""
        t = t.clone()
        dist.all_reduce(t)
        return t / self.n

    def step(self):
        """One step; the same measurements as ``SimulatedLearners.step`` (on every rank)."""
        i = self.schedule.next()
        w = self.f.flat()
        g, loss = grad_and_value(self.f.loss)(w, self.x[i], self.y[i])
        out = {"loss": float(self.mean(loss.detach().reshape(1)))}
        if self.algorithm == "ssgd":
            w = w - self.lr * self.mean(g)
        else:
            if self.measure:
                g_a, _ = grad_and_value(self.f.loss)(self.mean(w), self.x[i], self.y[i])
                means = self.mean(torch.stack([g, g_a]))
                out["effective_lr"] = effective_lr(self.lr, means[0], means[1])
            w = self.mix(w) - self.lr * g if self.combine == "before" else self.mix(w - self.lr * g)
        if self.measure:
            out["spread"] = float(self.mean((w - self.mean(w)).pow(2).sum().reshape(1)))
        self.f.load(w)
        self.steps += 1
        return out

    def replicas(self):
        """(n, P): every rank's weights (an all-gather)."""
        w = self.f.flat()
        parts = [torch.empty_like(w) for _ in range(self.n)]
        dist.all_gather(parts, w)
        return torch.stack(parts)

    def mix(self, w):
        """Σ_k W_jk w_k over this rank and its neighbours (equal weights), in rank order as W @ w sums."""
        replicas = {**self.exchange(w), self.rank: w}
        mixed = torch.zeros_like(w)
        for k in sorted(replicas):
            mixed = mixed + self.weight * replicas[k]
        return mixed

    def exchange(self, w):
        """Send ``w`` to every neighbour and receive theirs (point to point): {rank: their replica}."""
        received = {k: torch.empty_like(w) for k in self.neighbours}
        requests = [dist.isend(w.contiguous(), k) for k in self.neighbours]
        requests += [dist.irecv(received[k], k) for k in self.neighbours]
        for r in requests:
            r.wait()
        return received
