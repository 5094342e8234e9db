"""``landscape-kernels reproduce dpsgd``: decentralized parallel SGD against synchronous SGD at large
batch (Zhang et al., "Loss landscape dependent self-adjusting learning rates in decentralized
stochastic gradient descent", arXiv 2112.01433); ``docs/reproductions/dpsgd.md``.

For every (number of learners n, learning rate α) of the grid, SSGD and DPSGD train the same MLP from
the same start, each learner on its own shard with per-learner batch b (total batch n b). Along
training, at the averaged weights w_a: the loss and accuracy on a fixed subset, the largest Hessian
eigenvalues (Lanczos on the Hessian operator), the replicas' spread and its share in the top Hessian
eigenvectors, and the effective learning rate α_e = α (ḡ_DP · g(w_a)) / |g(w_a)|².

In one process the n learners are simulated (``training.decentralized.SimulatedLearners``: the same
iterates as real ranks to rounding). Under ``torchrun --nproc_per_node n`` every rank is one learner
(``DistributedLearner``: an all-reduce for SSGD, neighbour exchange for DPSGD) and the grid's n is the
number of ranks. Each run is kept in ``OUT/runs/<name>/result.json`` (``--resume`` reuses it).
"""
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import stats

from ..linalg.lanczos import lanczos_eigs
from ..operators.hessian import HessianOperator
from ..training.data import load_dataset
from ..training.decentralized import (
    ALGORITHMS, COMBINES, TOPOLOGIES, DistributedLearner, FlatModel, SimulatedLearners, spread_alignment)
from ..training.models import mlp
from ..training.progress import Progress
from ..training.sharpness import fixed_subset
from .job import Job, data_dir_option, dataset_option, option, read_json
from .reports.dpsgd import write_dpsgd_report
from .torchrun import torchrun_group, torchrun_world

ALIGNMENT_FACTOR = 10  # "aligned": the spread's share in the top-k eigenvectors ≥ 10 × the isotropic k / P
RANK_THRESHOLD = 0.0  # "self-adjusts": Spearman(λ_1 α, α_e / α) along training below this


@dataclass
class DpsgdConfig:
    seed: int = option(0, "seed of the network's start, the shards' batches and the measurement subset", minimum=0)
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    train_samples: int = option(8192, "training samples (a seeded subset), split into equal shards")
    subset: int = option(1024, "the fixed subset the loss, accuracy and Hessian are measured on")
    hidden: int = option(100, "width of the MLP's hidden layer (in-hidden-10, ReLU)")
    learners: tuple = option((4, 8, 16), "numbers of learners n (under torchrun: the number of ranks)")
    batch_size: int = option(128, "per-learner batch b (total batch n b)")
    lrs: tuple = option((0.25, 0.5, 0.75, 1.0, 1.5, 2.0), "learning rates α of the grid")
    steps: int = option(300, "steps per run")
    measure_every: int = option(50, "steps between measurements at w_a")
    top_k: int = option(5, "Hessian eigenvectors the spread is projected on")
    topology: str = option("ring", "DPSGD's graph", choices=TOPOLOGIES)
    combine: str = option("before", "DPSGD: mix the weights before the local step (the paper) or after it",
                          choices=COMBINES)
    converged_loss: float = option(0.5, "converged: the last tenth's mean training loss below this × the initial")
    diverged_loss: float = option(3.0, "diverged: a training loss above this × the initial (or not finite)")
    quick: bool = option(False, "a short run (the embedded digits, a smaller grid)")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.train_samples, c.subset, c.hidden = "digits", 512, 128, 16
            c.learners, c.batch_size, c.lrs, c.steps, c.measure_every, c.top_k = (4,), 32, (0.5, 4.0), 40, 20, 2
        if c.steps % c.measure_every:
            raise ValueError(f"steps ({c.steps}) must be a multiple of measure_every ({c.measure_every})")
        if not 0 < c.converged_loss < 1 < c.diverged_loss:
            raise ValueError(f"need 0 < converged_loss < 1 < diverged_loss, got {c.converged_loss}, {c.diverged_loss}")
        if any(n < 2 for n in c.learners):
            raise ValueError(f"every value of learners must be at least 2, got {c.learners}")
        world = torchrun_world()
        if world > 1:
            c.learners = (world,)
        return c


# ----------------------------------------------------------------------------- data
def training_data(cfg):
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    x = x.reshape(x.shape[0], -1)
    x = (x - x.mean()) / x.std()
    if cfg.train_samples < x.shape[0]:
        x, y = fixed_subset(x, y, cfg.train_samples, seed=cfg.seed + 1)
    largest = max(cfg.learners) * cfg.batch_size
    if x.shape[0] < largest:
        raise ValueError(f"train_samples ({x.shape[0]}) must hold at least one batch per learner (n b = {largest})")
    return (x, y), fixed_subset(x, y, min(cfg.subset, x.shape[0]), seed=cfg.seed)


# ----------------------------------------------------------------------------- one run
class Measurements:
    """The loss, accuracy, top Hessian eigenpairs and the spread's alignment at w_a on the fixed subset."""

    def __init__(self, cfg, model, subset):
        self.cfg, self.model, self.subset = cfg, model, subset
        self.flat = FlatModel(model, F.cross_entropy)
        self.previous = None  # the last eigenvectors: a warm start for the next Lanczos

    def __call__(self, replicas, spread=True):
        """The measurements at the replicas' average; ``spread``: with the spread's alignment (SSGD's replicas
        are equal: their spread is rounding)."""
        w_a = replicas.mean(0)
        self.flat.load(w_a)
        x, y = self.subset
        with torch.no_grad():
            out = self.model(x)
            loss, acc = float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
        if not math.isfinite(loss):
            return {"loss": loss, "accuracy": acc}
        H = HessianOperator(self.model, F.cross_entropy, self.subset, batch_size=len(y))
        eig = lanczos_eigs(H, self.cfg.top_k, tol=1e-4, seed=self.cfg.seed, v0=self.previous)
        self.previous = eig.eigenvectors
        out = {"loss": loss, "accuracy": acc, "eigenvalues": eig.eigenvalues.tolist()}
        if spread:
            deviations = replicas - w_a
            out.update(alignment=spread_alignment(deviations, eig.eigenvectors.to(deviations.dtype)),
                       isotropic=self.cfg.top_k / replicas.shape[1])
        return out


def run_one(cfg, ctx, train, subset, n, lr, algorithm):
    name = f"{algorithm}_n{n}_lr{lr:g}"
    folder = ctx.path("runs", name)

    def compute():
        model = mlp((train[0].shape[1], cfg.hidden, 10), bias=True, seed=cfg.seed)
        if dist.is_initialized():
            learner = DistributedLearner(model, F.cross_entropy, *train, cfg.batch_size, lr, algorithm, cfg.topology,
                                         cfg.combine, seed=cfg.seed)
        else:
            learner = SimulatedLearners(model, F.cross_entropy, *train, n, cfg.batch_size, lr, algorithm, cfg.topology,
                                        cfg.combine, seed=cfg.seed)
        measure = Measurements(cfg, mlp((train[0].shape[1], cfg.hidden, 10), bias=True, seed=cfg.seed), subset)
        spread_measured = algorithm == "dpsgd"
        records = [{"step": 0, **measure(learner.replicas(), spread_measured)}]
        losses, effective, spread = [], [], []
        interval = []
        bar = Progress(cfg.steps, desc=name, unit="step") if ctx.progress else None
        diverged = False
        for step in range(1, cfg.steps + 1):
            out = learner.step()
            losses.append(out["loss"])
            spread.append(out.get("spread"))
            if "effective_lr" in out:
                interval.append(out["effective_lr"] / lr)
            if bar is not None:
                bar.update(1)
            if not math.isfinite(out["loss"]) or out["loss"] > cfg.diverged_loss * losses[0]:
                diverged = True
                break
            if step % cfg.measure_every == 0:
                effective.append(float(np.mean(interval)) if interval else None)
                interval = []
                records.append({"step": step, **measure(learner.replicas(), spread_measured),
                                "effective_lr_ratio": effective[-1], "spread": out.get("spread")})
        if bar is not None:
            bar.close()
        tail = losses[-max(1, len(losses) // 10):]
        converged = not diverged and float(np.mean(tail)) < cfg.converged_loss * losses[0]
        last = records[-1]
        return {"name": name, "algorithm": algorithm, "learners": n, "lr": lr, "total_batch": n * cfg.batch_size,
                "diverged": diverged, "converged": converged, "steps_run": len(losses),
                "train_loss": losses[:: max(1, cfg.steps // 300)], "final_train_loss": float(np.mean(tail)),
                "initial_loss": losses[0], "records": records,
                "final_lambda1": last["eigenvalues"][0] if "eigenvalues" in last and not diverged else None,
                "final_accuracy": last["accuracy"] if not diverged else None}

    path = os.path.join(folder, "result.json")
    if JOB.writes_files():
        result = ctx.reuse(path, compute, label=name)
    else:  # the other ranks write nothing; they read what rank 0 kept (every rank decides alike)
        result = read_json(path) if ctx.resume and os.path.isfile(path) else compute()
    state = "diverged" if result["diverged"] else "converged" if result["converged"] else "did not converge"
    ctx.log(f"{name} (total batch {result['total_batch']}): {state}, final training loss "
            f"{result['final_train_loss']:.4g}, λ_1 {result['final_lambda1']}")
    return result


# ----------------------------------------------------------------------------- the job
class DpsgdJob(Job):
    """Decentralized parallel SGD against synchronous SGD at large batch: DPSGD's landscape-dependent noise
    and self-adjusting effective learning rate (Zhang et al. 2021); runs on torchrun ranks or simulated"""

    name, config, report = "dpsgd", DpsgdConfig, write_dpsgd_report
    trains = False

    def writes_files(self):
        return not dist.is_initialized() or dist.get_rank() == 0

    def main(self, args):
        with torchrun_group("cpu"):  # under torchrun: one learner per rank
            return super().main(args)

    def compute(self, cfg, ctx):
        train, subset = training_data(cfg)
        mode = f"{dist.get_world_size()} torchrun ranks" if dist.is_initialized() else "simulated learners"
        ctx.log(f"{cfg.dataset}: {train[0].shape[0]} training samples, MLP in-{cfg.hidden}-10, {mode}, "
                f"n {list(cfg.learners)} x lr {list(cfg.lrs)}, b {cfg.batch_size}, {cfg.steps} steps")
        runs = [run_one(cfg, ctx, train, subset, n, lr, algorithm)
                for n in cfg.learners for lr in cfg.lrs for algorithm in ALGORITHMS]
        return {"mode": mode, "runs": runs, "checks": checks(runs), "seconds": ctx.elapsed()}

    def headline(self, s):
        return f"{sum(c['holds'] for c in s['checks'])} of {len(s['checks'])} claims hold"


JOB = DpsgdJob()
run = JOB.run


def pairs(runs):
    """{(n, lr): {"ssgd": run, "dpsgd": run}}."""
    out = {}
    for r in runs:
        out.setdefault((r["learners"], r["lr"]), {})[r["algorithm"]] = r
    return out


def checks(runs):
    grid = pairs(runs)
    only_dp = [k for k, v in grid.items() if v["dpsgd"]["converged"] and not v["ssgd"]["converged"]]
    only_ss = [k for k, v in grid.items() if v["ssgd"]["converged"] and not v["dpsgd"]["converged"]]
    out = [{"claim": "DPSGD converges at (total batch, α) where SSGD does not",
            "values": {"cells where only DPSGD converges": [f"n b {grid[k]['dpsgd']['total_batch']}, α {k[1]:g}"
                                                            for k in sorted(only_dp)] or None,
                       "cells where only SSGD converges": len(only_ss)},
            "holds": bool(only_dp) and not only_ss}]
    ratios = [rec["effective_lr_ratio"] for k in only_dp for rec in grid[k]["dpsgd"]["records"][1:]
              if rec.get("effective_lr_ratio") is not None]
    out.append({"claim": "α_e < α where SSGD fails (the mean α_e / α over the measurement intervals of those DPSGD "
                         "runs below 1)",
                "values": {"mean α_e / α": float(np.mean(ratios)) if ratios else None, "intervals": len(ratios)},
                "holds": bool(ratios) and float(np.mean(ratios)) < 1})
    sharp, ratio = [], []
    for v in grid.values():
        r = v["dpsgd"]
        if r["diverged"]:
            continue
        for before, rec in zip(r["records"], r["records"][1:]):
            if "eigenvalues" in before and rec.get("effective_lr_ratio") is not None:
                sharp.append(before["eigenvalues"][0] * r["lr"])
                ratio.append(rec["effective_lr_ratio"])
    rho = float(stats.spearmanr(sharp, ratio).statistic) if len(set(ratio)) > 2 else None
    out.append({"claim": "α_e self-adjusts to the landscape: over every DPSGD interval, the sharper the start "
                         "(λ_1 α), the smaller α_e / α (Spearman below 0)",
                "values": {"Spearman(λ_1 α, α_e / α)": rho, "intervals": len(ratio)},
                "holds": rho is not None and rho < RANK_THRESHOLD})
    shares = [rec["alignment"] / rec["isotropic"] for v in grid.values() for rec in v["dpsgd"]["records"][1:]
              if rec.get("alignment") is not None and math.isfinite(rec["alignment"]) and not v["dpsgd"]["diverged"]]
    out.append({"claim": f"DPSGD's spread lies along the sharp directions (its share in the top Hessian eigenvectors "
                         f"≥ {ALIGNMENT_FACTOR}× an isotropic spread's, median over the measurements)",
                "values": {"median share / isotropic": float(np.median(shares)) if shares else None,
                           "measurements": len(shares)},
                "holds": bool(shares) and float(np.median(shares)) >= ALIGNMENT_FACTOR})
    both = [v for v in grid.values() if v["ssgd"]["converged"] and v["dpsgd"]["converged"]]
    flatter = [v["dpsgd"]["final_lambda1"] < v["ssgd"]["final_lambda1"] for v in both]
    out.append({"claim": "DPSGD ends flatter (a smaller final λ_1 than SSGD's at most cells where both converge)",
                "values": {"cells flatter": sum(flatter), "cells": len(both)},
                "holds": bool(both) and sum(flatter) > len(both) / 2})
    return out
