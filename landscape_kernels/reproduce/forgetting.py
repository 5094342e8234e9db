"""``landscape-kernels reproduce forgetting``: landscape-dependent constraints (LDC) against catastrophic
forgetting (Feng & Tu 2021; ``docs/reproductions/forgetting.md``).

Task 1 (digits 0, 1) is learned with W2 recorded before every step; its PCA directions p_1i and their
flatness F_1i (Feng & Tu 2021 search, every task-1 PC up to ``max_pcs``) define the constraints. From the
same task-1 solution w1*, task 2 (digits 2, 3) is then learned without constraint, with LDC in both
penalty forms and with EWC, tracking the test errors eps1 (task 1) and eps2 (task 2) after every epoch;
then a lambda sweep (the (eps1, eps2) trade-off) and an N_c sweep (eps1 + eps2). Both tasks are labelled
0 and 1 (first and second digit of the pair) on the same output units [our reading: the paper does not
say how the head is shared]; with digit-valued labels a new task's classes would win the argmax whatever
happens in W2.

Resumable: task 1 trains with a checkpoint (``task1_checkpoint.pt``), and every finished task-2 run is
kept in ``runs.json`` (``--resume`` reuses both).
"""
import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..analyses.forgetting import XI_FACTOR, EWCPenalty, LDCPenalty, diagonal_fisher
from ..analyses.variance_flatness import flatness_along_pcs, trajectory_pca
from ..training.callbacks import WindowRecorder
from ..training.data import digit_subset, load_dataset
from ..training.models import mlp
from ..training.trainer import SGDTrainer
from .job import Job, data_dir_option, dataset_option, option
from .reports.forgetting import write_forgetting_report

LAYER = "2.weight"
METHODS = ("none", "ldc-quadratic", "ldc-hinge", "ewc")


@dataclass
class ForgettingConfig:
    dataset: str = dataset_option("digits")
    data_dir: str = data_dir_option()
    batch_size: int = option(50, "SGD batch size B")
    lr: float = option(0.1, "SGD learning rate")
    task1_epochs: int = option(200, "epochs on task 1 (digits 0, 1)")
    task2_epochs: int = option(30, "epochs on task 2 (digits 2, 3)")
    window: int = 2000
    max_pcs: int = 100  # task-1 PCs whose flatness is measured (the N_c sharpest are constrained)
    num_constraints: int = option(20, "N_c, the sharpest task-1 directions held")
    lam: float = option(10.0, "strength lambda of the constraints", minimum=0)
    lambdas: tuple = (0.1, 1.0, 10.0, 100.0, 1000.0)
    constraint_counts: tuple = (1, 5, 10, 20, 50)
    seed: int = option(0, "seed of the initialisation and the minibatch order", minimum=0)
    quick: bool = option(False, "a short smoke run of the whole job")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.task1_epochs, c.task2_epochs, c.window, c.max_pcs = 20, 5, 150, 20
            c.lambdas, c.constraint_counts, c.num_constraints = (1.0, 100.0), (2, 10), 10
        return c


class TestErrors:
    """after_epoch callback: test error of each task."""

    def __init__(self, tasks):
        self.tasks, self.history = tasks, []

    def after_epoch(self, trainer, record):
        self.history.append({name: 1.0 - trainer.evaluate(x, y)[1] for name, (x, y) in self.tasks.items()})


def _task(x, y, digits):
    return digit_subset(x, y, digits, relabel=True)


def _learn_task1(cfg, train1, ctx):
    """The task-1 network and its W2 window (trained with a checkpoint, so ``--resume`` continues it)."""
    model = mlp((train1[0].shape[1], 50, 50, 10), seed=cfg.seed)
    window = WindowRecorder(model, [LAYER], cfg.window)
    trainer = SGDTrainer(model, *train1, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, callbacks=[window],
                         checkpoint=ctx.path("task1_checkpoint.pt"), checkpoint_seconds=ctx.checkpoint_seconds)
    ctx.resume_training(trainer).run(max_epochs=cfg.task1_epochs, stopping_rule=None, progress=ctx.progress)
    return model, window


class ForgettingJob(Job):
    """landscape-dependent constraints against catastrophic forgetting (Feng & Tu 2021) against EWC"""

    name, config, report = "forgetting", ForgettingConfig, write_forgetting_report

    def compute(self, cfg, ctx):
        log = ctx.log
        x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
        xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
        train1, train2 = _task(x, y, (0, 1)), _task(x, y, (2, 3))
        tests = {"eps1": _task(xt, yt, (0, 1)), "eps2": _task(xt, yt, (2, 3))}
        model, window = _learn_task1(cfg, train1, ctx)
        _, snaps = window.snapshots()
        pca = trajectory_pca(snaps, gamma_range=(1, None))
        rank = int((pca.variances > 1e-12 * pca.variances[0]).sum())
        pcs = list(range(1, min(cfg.max_pcs, rank) + 1))
        flat = flatness_along_pcs(model, F.cross_entropy, train1, pca.components.float(), pcs, param=LAYER)
        usable = ~flat.saturated_left & ~flat.saturated_right
        order = [i for i in torch.argsort(flat.widths).tolist() if bool(usable[i])]  # sharpest first
        log(f"task 1: {len(train1[0])} images, PCA of {snaps.shape[0]} W2 snapshots, flatness of {len(pcs)} PCs "
            f"(F from {float(flat.widths.min()):.3g} to {float(flat.widths.max()):.3g})")
        w1 = copy.deepcopy(model)
        fisher = diagonal_fisher(w1, F.cross_entropy, *train1)

        def penalty(method, lam, n_c):
            if method == "none":
                return None
            if method == "ewc":
                return EWCPenalty(w1, fisher, lam, n_c)
            chosen = order[:n_c]
            return LDCPenalty(LAYER, dict(w1.named_parameters())[LAYER], pca.components[chosen].float(),
                              flat.widths[chosen].float(), lam, form=method.split("-")[1])

        def learn_task2(method, lam, n_c):
            net = copy.deepcopy(w1)
            errors = TestErrors(tests)
            try:
                SGDTrainer(net, *train2, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed + 1, callbacks=[errors],
                           penalty=penalty(method, lam, n_c)).run(max_epochs=cfg.task2_epochs, stopping_rule=None)
            except FloatingPointError:  # a stiff penalty (lr * 2 lambda / F^2 > 2) makes SGD diverge: a result
                return {"method": method, "lam": lam, "num_constraints": n_c, "curve": errors.history,
                        "eps1": float("nan"), "eps2": float("nan"), "q": None, "diverged": True}
            q = None
            if method.startswith("ldc") or method == "none":
                probe = penalty("ldc-quadratic", 1.0, min(cfg.num_constraints, len(order)))
                q = probe.displacement(net).detach().tolist()
            return {"method": method, "lam": lam, "num_constraints": n_c, "curve": errors.history,
                    "eps1": errors.history[-1]["eps1"], "eps2": errors.history[-1]["eps2"], "q": q, "diverged": False}

        finished = ctx.stages("runs.json")

        def task2(method, lam, n_c):
            return finished.run(f"{method} lambda {lam:g} N_c {n_c}", lambda: learn_task2(method, lam, n_c))

        n_c = min(cfg.num_constraints, len(order))
        main_runs = [task2(m, cfg.lam, n_c) for m in METHODS]
        for r in main_runs:
            log(f"task 2, {r['method']:14s} lambda {r['lam']:g}, N_c {n_c}: eps1 {r['eps1']:.3f}, eps2 {r['eps2']:.3f}")
        lam_sweep = [task2(m, lam, n_c) for m in METHODS[1:] for lam in cfg.lambdas]
        nc_sweep = [task2(m, cfg.lam, min(k, len(order))) for m in METHODS[1:] for k in cfg.constraint_counts]
        chosen = order[:n_c]
        return {
            "dataset": cfg.dataset,
            "task1": {"pcs": pcs, "widths": flat.widths.tolist(), "saturated": (~usable).tolist(),
                      "constrained_pcs": [pcs[i] for i in chosen], "xi": (XI_FACTOR * flat.widths[chosen]).tolist()},
            "runs": main_runs, "lambda_sweep": lam_sweep, "constraint_sweep": nc_sweep,
        }

    def headline(self, s):
        return ", ".join(f"{r['method']}: eps1 {r['eps1']:.3f} eps2 {r['eps2']:.3f}" for r in s["runs"])


JOB = ForgettingJob()
run = JOB.run
