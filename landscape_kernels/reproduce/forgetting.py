"""``landscape-kernels reproduce forgetting``: landscape-dependent constraints (LDC) against catastrophic
forgetting (Feng & Tu 2021; ``docs/reproductions/forgetting.md``).

Task 1 (digits 0, 1) is learned with the constrained weights recorded before every step: W2 alone
(``--space w2``, the matrix of the paper's figures) or every weight (``--space all``, the Gram PCA of the
window). The PCA directions p_1i of that trajectory and their flatness F_1i (Feng & Tu 2021 search,
every task-1 PC up to ``max_pcs``) define the constraints. From the same task-1 solution w1*, task 2
(digits 2, 3) is then learned without constraint, with LDC in both penalty forms, and with EWC on the
full diagonal Fisher (the standard form) and on its N_c largest entries, tracking the test errors eps1
(task 1) and eps2 (task 2) after every epoch; then lambda sweeps (the (eps1, eps2) trade-off curves,
compared at matched eps2) and an N_c sweep (eps1 + eps2).

The penalties are applied by their exact proximal step after every SGD step (``--integrator proximal``,
stable for any lambda) or added to the loss (``explicit``, which diverges once lr times the penalty's
curvature exceeds 2). ``--head shared``: both tasks are labelled 0 and 1 on the same output units (the
paper does not say how the head is shared); ``--head separate``: task 1 is read from outputs 0-1 and
task 2 from outputs 2-3 of the same last layer (a multi-head network: each task's loss and error use
its own units).

Resumable: task 1 trains with a checkpoint (``task1_checkpoint.pt``), and every finished task-2 run is
kept in ``runs.json`` (``--resume`` reuses both).
"""
import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..analyses.forgetting import XI_FACTOR, EWCPenalty, LDCPenalty, matched_errors
from ..analyses.variance_flatness import flatness_along_pcs, trajectory_pca
from ..capture.model import chosen_parameters, flat_values
from ..operators.diagonal import fisher_diagonal
from ..training.callbacks import WindowRecorder
from ..training.data import digit_subset, load_dataset
from ..training.models import mlp
from ..training.trainer import SGDTrainer
from .job import Job, data_dir_option, dataset_option, option
from .reports.forgetting import write_forgetting_report

SPACES = {"w2": ["2.weight"], "all": ["0.weight", "2.weight", "4.weight"]}  # the weights of mlp(784, 50, 50, 10)
METHODS = ("none", "ldc-quadratic", "ldc-hinge", "ewc", "ewc-top")  # ewc: full diagonal; ewc-top: N_c largest
SWEPT = METHODS[1:]
HEADS = ("shared", "separate")
INTEGRATORS = ("proximal", "explicit")
MATCHED_EPS2 = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # task-2 errors at which the trade-off curves are compared


@dataclass
class ForgettingConfig:
    dataset: str = dataset_option("digits")
    data_dir: str = data_dir_option()
    batch_size: int = option(50, "SGD batch size B")
    lr: float = option(0.1, "SGD learning rate")
    task1_epochs: int = option(200, "epochs on task 1 (digits 0, 1)")
    task2_epochs: int = option(30, "epochs on task 2 (digits 2, 3)")
    space: str = option("all", "weights whose task-1 trajectory PCA gives the LDC directions: w2 (the paper's "
                               "figures) or all (every weight)", choices=tuple(SPACES))
    head: str = option("shared", "shared: both tasks on output units 0-1; separate: task 2 on units 2-3",
                       choices=HEADS)
    integrator: str = option("proximal", "proximal: the penalty's exact implicit step after each SGD step (stable "
                                         "for any lambda); explicit: its gradient added to the loss",
                             choices=INTEGRATORS)
    window: int = option(2000, "task-1 snapshots in the PCA window")
    max_pcs: int = option(100, "task-1 PCs whose flatness is measured (the N_c sharpest are constrained)")
    num_constraints: int = option(20, "N_c, the sharpest task-1 directions (LDC) or largest-Fisher weights "
                                      "(ewc-top) held")
    lam: float = option(10.0, "strength lambda of the constraints in the main runs and the N_c sweep", minimum=0)
    lambdas: tuple = option((0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9), "the lambda sweep")
    constraint_counts: tuple = option((1, 5, 10, 20, 50, 100), "the N_c sweep")
    seed: int = option(0, "seed of the initialisation and the minibatch order", minimum=0)
    quick: bool = option(False, "a short smoke run of the whole job")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.task1_epochs, c.task2_epochs, c.window, c.max_pcs = 20, 5, 150, 20
            c.lambdas, c.constraint_counts, c.num_constraints = (1.0, 100.0), (2, 10), 10
        return c


class OutputSlice(nn.Module):
    """The units ``start:stop`` of a network's output: one task's head of a shared last layer."""

    def __init__(self, start, stop):
        super().__init__()
        self.start, self.stop = int(start), int(stop)

    def forward(self, x):
        return x[:, self.start : self.stop]


def task_network(model, head, task):
    """The network task ``task`` (1 or 2) trains and is tested through: ``model`` itself with a shared head;
    with separate heads a view of the same layers ending in that task's two output units (the parameter
    names stay those of ``model``, so penalties and recorders address both alike)."""
    if head == "shared":
        return model
    return nn.Sequential(*model, OutputSlice(2 * (task - 1), 2 * task))


def test_error(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) != y).double().mean())


class TestErrors:
    """after_epoch callback: the test error of each task, each through its own network (head)."""

    def __init__(self, tasks):
        self.tasks, self.history = tasks, []  # {name: (network, x, y)}

    def after_epoch(self, trainer, record):
        self.history.append({name: test_error(net, x, y) for name, (net, x, y) in self.tasks.items()})


def _task(x, y, digits):
    return digit_subset(x, y, digits, relabel=True)


def _learn_task1(cfg, train1, ctx):
    """The task-1 network and its window of the constrained weights (trained with a checkpoint, so
    ``--resume`` continues it)."""
    model = mlp((train1[0].shape[1], 50, 50, 10), seed=cfg.seed)
    window = WindowRecorder(model, SPACES[cfg.space], cfg.window)
    trainer = SGDTrainer(task_network(model, cfg.head, 1), *train1, batch_size=cfg.batch_size, lr=cfg.lr,
                         seed=cfg.seed, callbacks=[window], checkpoint=ctx.path("task1_checkpoint.pt"),
                         checkpoint_seconds=ctx.checkpoint_seconds)
    ctx.resume_training(trainer).run(max_epochs=cfg.task1_epochs, stopping_rule=None, progress=ctx.progress)
    return model, window


def compare_at_matched_eps2(lam_sweep, num_test1, levels=MATCHED_EPS2):
    """eps1 of every method at the task-2 errors ``levels`` along its lambda sweep, and whether the better
    LDC form is lower than the better EWC form at each level: "yes" / "no" when the two differ by more
    than twice the binomial standard error of a difference of two error rates on the ``num_test1``
    task-1 test images, else "tie"."""
    curves = {m: [(r["eps2"], r["eps1"]) for r in lam_sweep if r["method"] == m] for m in SWEPT}
    eps1 = matched_errors(curves, levels)
    rows = []
    for i, level in enumerate(levels):
        ldc = [eps1[m][i] for m in ("ldc-quadratic", "ldc-hinge") if eps1[m][i] is not None]
        ewc = [eps1[m][i] for m in ("ewc", "ewc-top") if eps1[m][i] is not None]
        verdict = None
        if ldc and ewc:
            a, b = min(ldc), min(ewc)
            p = min(max((a + b) / 2, 1.0 / num_test1), 1 - 1.0 / num_test1)
            margin = 2 * math.sqrt(2 * p * (1 - p) / num_test1)
            verdict = "yes" if a < b - margin else "no" if b < a - margin else "tie"
        rows.append({"eps2": level, **{m: eps1[m][i] for m in SWEPT},
                     "best_ldc": min(ldc) if ldc else None, "best_ewc": min(ewc) if ewc else None,
                     "ldc_beats_ewc": verdict})
    return rows


def fisher_scale(fisher):
    """How stiff EWC is at a given lambda: the largest, median and mean diagonal Fisher entry over all
    weights (the proximal step scales each displacement by 1 / (1 + lr lambda F_j))."""
    flat = torch.cat([f.reshape(-1) for f in fisher.values()]).double()
    return {"max": float(flat.max()), "median": float(flat.median()), "mean": float(flat.mean())}


class ForgettingJob(Job):
    """landscape-dependent constraints against catastrophic forgetting (Feng & Tu 2021) against EWC"""

    name, config, report = "forgetting", ForgettingConfig, write_forgetting_report

    def compute(self, cfg, ctx):
        log = ctx.log
        x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
        xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
        train1, train2 = _task(x, y, (0, 1)), _task(x, y, (2, 3))
        test1, test2 = _task(xt, yt, (0, 1)), _task(xt, yt, (2, 3))
        params = SPACES[cfg.space]
        model, window = _learn_task1(cfg, train1, ctx)
        net1 = task_network(model, cfg.head, 1)
        _, snaps = window.snapshots()
        pca = trajectory_pca(snaps, gamma_range=(1, None))
        rank = int((pca.variances > 1e-12 * pca.variances[0]).sum())
        pcs = list(range(1, min(cfg.max_pcs, rank) + 1))
        comps = pca.components[: len(pcs)].float()
        flat = flatness_along_pcs(net1, F.cross_entropy, train1, comps, pcs, param=params)
        usable = ~flat.saturated_left & ~flat.saturated_right
        order = [i for i in torch.argsort(flat.widths).tolist() if bool(usable[i])]  # sharpest first
        log(f"task 1: {len(train1[0])} images, PCA of {snaps.shape[0]} snapshots of {'+'.join(params)} "
            f"({snaps.shape[1]} numbers), flatness of {len(pcs)} PCs (F from {float(flat.widths.min()):.3g} to "
            f"{float(flat.widths.max()):.3g})")
        w1 = copy.deepcopy(model)
        w1_flat = flat_values(chosen_parameters(w1, params)[1])  # the constrained weights of w1*
        w1_all = flat_values(w1.parameters())
        # EWC's exact diagonal empirical Fisher of task 1 (operators.diagonal, the fused per-sample moments)
        fisher = fisher_diagonal(task_network(w1, cfg.head, 1), F.cross_entropy, tuple(train1), batch_size=4096)
        num_weights = sum(f.numel() for f in fisher.values())

        def penalty(method, lam, n_c):
            if method == "none":
                return None
            if method == "ewc":
                return EWCPenalty(w1, fisher, lam)
            if method == "ewc-top":
                return EWCPenalty(w1, fisher, lam, min(n_c, num_weights))
            chosen = order[:n_c]
            return LDCPenalty(params, w1_flat, comps[chosen], flat.widths[chosen].float(), lam,
                              form=method.split("-")[1])

        def learn_task2(method, lam, n_c):
            net = copy.deepcopy(w1)
            errors = TestErrors({"eps1": (task_network(net, cfg.head, 1), *test1),
                                 "eps2": (task_network(net, cfg.head, 2), *test2)})
            p = penalty(method, lam, n_c)
            try:
                SGDTrainer(task_network(net, cfg.head, 2), *train2, batch_size=cfg.batch_size, lr=cfg.lr,
                           seed=cfg.seed + 1, callbacks=[errors], penalty=p,
                           proximal=p is not None and cfg.integrator == "proximal").run(
                               max_epochs=cfg.task2_epochs, stopping_rule=None)
            except FloatingPointError:  # an explicit step on a stiff penalty (lr * curvature > 2) diverges: a result
                return {"method": method, "lam": lam, "num_constraints": n_c, "curve": errors.history,
                        "eps1": float("nan"), "eps2": float("nan"), "q": None, "diverged": True}
            probe = penalty("ldc-quadratic", 1.0, min(cfg.num_constraints, len(order)))
            return {"method": method, "lam": lam, "num_constraints": n_c, "curve": errors.history,
                    "eps1": errors.history[-1]["eps1"], "eps2": errors.history[-1]["eps2"],
                    "q": probe.displacement(net).detach().tolist(),
                    "distance": float((flat_values(net.parameters()) - w1_all).norm()),
                    "diverged": False}

        finished = ctx.stages("runs.json")

        def task2(method, lam, n_c):
            return finished.run(f"{method} lambda {lam:g} N_c {n_c}", lambda: learn_task2(method, lam, n_c))

        n_c = min(cfg.num_constraints, len(order))
        main_runs = [task2(m, cfg.lam, n_c) for m in METHODS]
        for r in main_runs:
            log(f"task 2, {r['method']:14s} lambda {r['lam']:g}, N_c {n_c}: eps1 {r['eps1']:.3f}, eps2 {r['eps2']:.3f}")
        lam_sweep = [task2(m, lam, n_c) for m in SWEPT for lam in cfg.lambdas]
        nc_sweep = [task2(m, cfg.lam, min(k, len(order)) if m.startswith("ldc") else k)
                    for m in ("ldc-quadratic", "ldc-hinge", "ewc-top") for k in cfg.constraint_counts]
        chosen = order[:n_c]
        return {
            "dataset": cfg.dataset,
            "task1": {"pcs": pcs, "widths": flat.widths.tolist(), "saturated": (~usable).tolist(),
                      "constrained_pcs": [pcs[i] for i in chosen], "xi": (XI_FACTOR * flat.widths[chosen]).tolist(),
                      "space": params, "space_size": int(snaps.shape[1]), "num_weights": int(num_weights),
                      "test_error": test_error(net1, *test1), "fisher": fisher_scale(fisher)},
            "runs": main_runs, "lambda_sweep": lam_sweep, "constraint_sweep": nc_sweep,
            "matched_eps2": compare_at_matched_eps2(lam_sweep, len(test1[1])),
        }

    def headline(self, s):
        return ", ".join(f"{r['method']}: eps1 {r['eps1']:.3f} eps2 {r['eps2']:.3f}" for r in s["runs"])


JOB = ForgettingJob()
run = JOB.run
