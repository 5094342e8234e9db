"""``landscape-kernels reproduce duality``: the activity–weight duality and its generalisation-gap
decomposition (Feng, Zhang & Tu, Nat. Mach. Intell. 2023, arXiv 2203.10736); ``docs/reproductions/duality.md``.

The paper's system: MNIST, 400 correctly labelled training images per class, the first 1,000 test
images, a 784-30-30-10 ReLU network without biases, SGD with B = 25 and lr 0.1 until the loss of the
correctly labelled training samples is below 1e-3 with their accuracy above 0.99 over the last 9
epochs (at most 1,000 epochs). For each trained network the gap decomposition of the 30 x 30 matrix
"3.weight" (``analyses.duality``). Sweeps vary one setting at a time around that baseline, with the
grids of the authors' code (github.com/YuFengDuke/A-W-Duality-Project, ``model_config.py``), each with
the baseline value added: batch size, lr, initialisation scale (every initial weight multiplied),
dropout after the first hidden layer, a weight-norm penalty beta |w| for the first 200 epochs, label
noise (a fraction rho of the training set mislabeled, added on top of the correct samples) and the
training-set size. The baseline run is shared by every sweep.

Each (setting, seed) run lives in ``OUT/runs/NAME_seedS/``: ``checkpoint.pt`` while it trains
(``--resume`` continues it), then ``result.json``.
"""
import math
import os
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ..analyses.duality import gap_decomposition
from ..capture.model import eval_mode
from ..training.data import load_dataset, with_label_noise
from ..training.models import duality_mlp
from ..training.trainer import SGDTrainer
from .job import Job, data_dir_option, dataset_option, option
from .reports.duality import write_duality_report

PARAM = "3.weight"
# the authors' grids (model_config.py), each with the baseline value
SWEEPS = {"batch_size": (25, 100, 200, 400), "lr": (0.005, 0.01, 0.02, 0.05, 0.1), "init_scale": (1.0, 4.0, 5.0, 6.0, 7.0),
          "dropout": (0.0, 0.05, 0.1, 0.2, 0.3), "weight_penalty": (0.0, 0.005, 0.01, 0.02),
          "label_noise": (0.0, 0.091, 0.13, 0.167, 0.2), "per_class": (400, 800, 1600, 3200)}
QUICK_SWEEPS = {"batch_size": (25, 100), "lr": (0.02, 0.1), "init_scale": (1.0, 3.0), "dropout": (0.0, 0.2),
                "weight_penalty": (0.0, 0.01), "label_noise": (0.0, 0.167), "per_class": (60, 110)}
# which factor each setting acts through and which way, as we read the paper: "sharpness" = sigma_g,
# "spread" = sigma_w (the size of the solution); +1: it grows with the setting
EXPECTED = {"batch_size": ("sharpness", +1), "lr": ("sharpness", -1), "init_scale": ("spread", +1),
            "dropout": ("sharpness", -1), "weight_penalty": ("spread", -1), "label_noise": ("sharpness", +1),
            "per_class": ("spread", -1)}
FACTORS = {"sharpness": "sigma_g_total", "spread": "sigma_w_total"}
# the criteria of the checks, fixed before any run
TRACK_R, TRACK_SLOPE = 0.9, (0.8, 1.25)  # Pearson r of estimate vs real gap, and the OLS slope
TOP_FRACTION, TOP_SHARE = 0.1, 0.5       # the top 10 % of directions carry at least half the estimate
NORM_R = 0.8                             # Pearson r of sigma_w against |W| over the init-scale sweep
TREND_RHO, TREND_CHANGE = 0.8, 0.2       # a factor acts: |Spearman| >= 0.8 and a change of >= 20 %


@dataclass
class DualityConfig:
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    per_class: int = option(400, "correctly labelled training samples per class (the paper: 400)")
    test_size: int = option(1000, "test samples, the first ones of the test set (the authors: 1000)")
    hidden: int = option(30, "width of the two hidden layers (the paper: 30)")
    batch_size: int = option(25, "SGD batch size B of the baseline")
    lr: float = option(0.1, "SGD lr of the baseline")
    init_scale: float = option(1.0, "every initial weight multiplied by this")
    dropout: float = option(0.0, "dropout after the first hidden layer", minimum=0)
    weight_penalty: float = option(0.0, "beta of the penalty beta * |w| (all weights) in the first --penalty-epochs",
                                   minimum=0)
    penalty_epochs: int = option(200, "epochs the weight penalty is on (the authors: 200)")
    label_noise: float = option(0.0, "fraction rho of mislabeled samples in the training set", minimum=0)
    stop_loss: float = option(1e-3, "train until the correct samples' loss is below this")
    max_epochs: int = option(1000, "at most this many epochs")
    sweeps: tuple = option(tuple(SWEEPS), f"settings swept one at a time: {', '.join(SWEEPS)}", type=str)
    seeds: tuple = option((0, 1, 2), "seeds per point (initialisation and minibatch order)", minimum=0)
    quick: bool = option(False, "two points per sweep on the embedded digits, one seed: seconds")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.per_class, c.test_size, c.hidden = "digits", 60, 359, 12
            c.max_epochs, c.stop_loss, c.penalty_epochs, c.seeds = 80, 1e-2, 20, c.seeds[:1]
        bad = [s for s in c.sweeps if s not in SWEEPS]
        if bad:
            raise ValueError(f"sweeps: unknown {bad}; choose from {', '.join(SWEEPS)}")
        if not c.seeds:
            raise ValueError("seeds must list at least one seed")
        if c.label_noise >= 1:
            raise ValueError(f"label_noise must be below 1, got {c.label_noise}")
        if c.dropout >= 1:
            raise ValueError(f"dropout must be below 1, got {c.dropout}")
        return c

    def grids(self):
        """{sweep: values}, the baseline's value added where the grid lacks it."""
        table = QUICK_SWEEPS if self.quick else SWEEPS
        out = {}
        for name in self.sweeps:
            base = getattr(self, name)
            out[name] = tuple(sorted(set(table[name]) | {base}))
        return out


def run_name(cfg, setting=None, value=None):
    """"base" for the baseline, else "SETTING=VALUE"."""
    if setting is None or value == getattr(cfg, setting):
        return "base"
    return f"{setting}={value:g}"


def load_data(cfg, per_class, label_noise):
    """(training set with its mislabeled part, the correctly labelled part, test set). The correct part
    is the first ``per_class`` samples of every class of one fixed shuffle (so a larger per_class
    contains a smaller one); the mislabeled part, rho / (1 - rho) times as many, comes from the rest,
    each with a label drawn from the other classes."""
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    x = x.reshape(x.shape[0], -1)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    chosen, rest = [], []
    for c in range(int(y.max()) + 1):
        members = order[y[order] == c]
        if len(members) < per_class:
            raise ValueError(f"per_class {per_class} exceeds class {c} of {cfg.dataset} ({len(members)} training samples)")
        chosen.append(members[:per_class])
        rest.append(members[per_class:])
    correct = torch.cat(chosen).sort().values
    n_extra = round(len(correct) * label_noise / (1 - label_noise))
    pool = torch.cat(rest)
    if n_extra > len(pool):
        raise ValueError(f"label_noise {label_noise} needs {n_extra} more samples than {cfg.dataset} has left ({len(pool)})")
    extra = pool[torch.randperm(len(pool), generator=g)[:n_extra]]
    wrong, _ = with_label_noise(y[extra], 1.0, num_classes=int(y.max()) + 1, seed=1)
    xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
    xt = xt.reshape(xt.shape[0], -1)[: cfg.test_size]
    train = (torch.cat([x[correct], x[extra]]), torch.cat([y[correct], wrong]))
    return train, (x[correct], y[correct]), (xt, yt[: cfg.test_size])


class CorrectSetStop:
    """The authors' stopping rule: the loss of the correctly labelled training samples below ``loss``
    and their accuracy above ``accuracy`` on average over the last ``window`` epochs. Each epoch's
    numbers go into the trainer's history (so a resumed run keeps them)."""

    def __init__(self, model, correct, loss, window=9, accuracy=0.99):
        self.model, self.correct, self.loss, self.window, self.accuracy = model, correct, loss, window, accuracy

    def satisfied(self, history):
        x, y = self.correct
        with torch.no_grad(), eval_mode(self.model):
            out = self.model(x)
            history[-1]["correct_loss"] = float(F.cross_entropy(out, y))
            history[-1]["correct_accuracy"] = float((out.argmax(1) == y).double().mean())
        recent = [r.get("correct_accuracy", 0.0) for r in history[-self.window :]]
        return (len(recent) == self.window and sum(recent) / self.window > self.accuracy
                and history[-1]["correct_loss"] < self.loss)


def weight_penalty(trainer, beta, epochs):
    """beta * |w| over all weights while the trainer is in its first ``epochs`` epochs (the authors')."""
    def penalty(model):
        if trainer.epoch >= epochs:
            return torch.zeros((), device=trainer.device)
        return beta * torch.sqrt(sum((p * p).sum() for p in model.parameters()))

    return penalty


def run_one(cfg, folder, seed, ctx):
    """Train one (settings, seed) run and decompose its gap; its result dict."""
    t0 = time.perf_counter()
    train, correct, test = load_data(cfg, cfg.per_class, cfg.label_noise)
    model = duality_mlp((train[0].shape[1], cfg.hidden, cfg.hidden, 10), cfg.dropout, cfg.init_scale, seed=seed)
    os.makedirs(folder, exist_ok=True)
    trainer = SGDTrainer(model, *train, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                         checkpoint=os.path.join(folder, "checkpoint.pt"), checkpoint_seconds=ctx.checkpoint_seconds)
    if cfg.weight_penalty > 0:
        trainer.penalty = weight_penalty(trainer, cfg.weight_penalty, cfg.penalty_epochs)
    ctx.resume_training(trainer).run(max_epochs=cfg.max_epochs, stopping_rule=CorrectSetStop(model, correct, cfg.stop_loss),
                                     progress=ctx.progress)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    d = gap_decomposition(model, F.cross_entropy, PARAM, correct, test)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    last = trainer.history[-1]
    result = {"seed": seed, "settings": {f: getattr(cfg, f) for f in SWEEPS}, "epochs": len(trainer.history),
              "stopped_by": trainer.stopped_by, "correct_loss": last.get("correct_loss"),
              "correct_accuracy": last.get("correct_accuracy"), "test_accuracy": test_acc,
              "decomposition": d.to_dict(arrays=True),
              "seconds": {"training": train_seconds, "decomposition": time.perf_counter() - t1}}
    if os.path.isfile(trainer.checkpoint):
        os.remove(trainer.checkpoint)
    ctx.log(f"{os.path.basename(folder)}: gap {d.real_gap:.4f}, estimate {d.estimate:.4f}, top 10 % share "
            f"{d.top_share[0.1]:.2f}, sigma_g {d.sigma_g_total:.3g}, sigma_w {d.sigma_w_total:.3g}, |W| {d.weight_norm:.3g}, "
            f"{len(trainer.history)} epochs ({trainer.stopped_by}), {time.perf_counter() - t0:.0f} s")
    return result


class DualityJob(Job):
    """activity–weight duality: the generalisation gap decomposed into sharpness x dual-weight spread over the
    layer-Hessian eigendirections, across training settings (Feng, Zhang & Tu 2023)"""

    name, config, report = "duality", DualityConfig, write_duality_report

    def compute(self, cfg, ctx):
        grids = cfg.grids()
        ctx.log(f"{cfg.dataset}: {cfg.per_class} per class, {cfg.test_size} test samples, network in-{cfg.hidden}-"
                f"{cfg.hidden}-10 no bias, matrix {PARAM}; baseline B {cfg.batch_size}, lr {cfg.lr}; sweeps "
                + "; ".join(f"{k} {list(v)}" for k, v in grids.items()) + f"; seeds {list(cfg.seeds)}")
        runs, members = {}, {}
        points = [(None, None)] + [(k, v) for k, vals in grids.items() for v in vals if v != getattr(cfg, k)]
        for setting, value in points:
            point = cfg if setting is None else replace(cfg, **{setting: value})
            for seed in cfg.seeds:
                name = f"{run_name(cfg, setting, value)}_seed{seed}"
                folder = ctx.path("runs", name)
                runs[name] = ctx.reuse(os.path.join(folder, "result.json"), label=folder,
                                       compute=lambda: run_one(point, folder, seed, ctx))
        for sweep, values in grids.items():
            members[sweep] = [(v, name) for v in values for name in runs
                              if name.rsplit("_seed", 1)[0] == run_name(cfg, sweep, v)]
        by_sweep = {s: sweep_summary(runs, m) for s, m in members.items()}
        return {"runs": {n: _without_arrays(r) for n, r in runs.items()}, "members": members, "by_sweep": by_sweep,
                "checks": checks(runs, members, by_sweep)}, {"runs": runs}

    def headline(self, s):
        holds = sum(c["holds"] for c in s["checks"])
        return f"{holds} of {len(s['checks'])} claims hold"


JOB = DualityJob()
run = JOB.run


def _without_arrays(r):
    d = {k: v for k, v in r["decomposition"].items() if not isinstance(v, list)}
    return {**r, "decomposition": d}


def sweep_summary(runs, members):
    """Per grid value: the mean and spread over seeds of the gap, the estimate, the two factors, |W|."""
    keys = ("real_gap", "estimate", "sigma_g_total", "sigma_w_total", "weight_norm")
    out = []
    for value in dict.fromkeys(v for v, _ in members):
        rs = [runs[n] for v, n in members if v == value]
        row = {"value": value, "seeds": len(rs), "test_accuracy": statistics.fmean(r["test_accuracy"] for r in rs)}
        for k in keys:
            vals = [r["decomposition"][k] for r in rs]
            row[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        row["top_share"] = statistics.fmean(r["decomposition"]["top_share"][str(TOP_FRACTION)] for r in rs)
        out.append(row)
    return out


def _fit(x, y):
    """(Pearson r, OLS slope of y on x), NaN with fewer than 3 points or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(np.corrcoef(x, y)[0, 1]), float(np.polyfit(x, y, 1)[0])


def checks(runs, members, by_sweep):
    """The paper's claims, each with the numbers it rests on (criteria fixed above, before any run)."""
    out = []
    for sweep, m in members.items():
        gaps = [runs[n]["decomposition"]["real_gap"] for _, n in m]
        est = [runs[n]["decomposition"]["estimate"] for _, n in m]
        r, slope = _fit(gaps, est)
        out.append({"claim": f"the estimate tracks the real gap across the {sweep} sweep (r ≥ {TRACK_R}, slope in "
                             f"[{TRACK_SLOPE[0]}, {TRACK_SLOPE[1]}])", "values": {"r": r, "slope": slope, "runs": len(m)},
                    "holds": bool(r >= TRACK_R and TRACK_SLOPE[0] <= slope <= TRACK_SLOPE[1]),
                    **({"caveat": "fewer than 3 runs"} if len(m) < 3 else {})})
    shares = [r["decomposition"]["top_share"][str(TOP_FRACTION)] for r in runs.values()]
    median = statistics.median(shares)
    out.append({"claim": f"a few sharp directions dominate: the top {TOP_FRACTION:.0%} of directions (by λ) carry "
                         f"≥ {TOP_SHARE:.0%} of the estimate (median run)",
                "values": {"median share": median, "min": min(shares), "max": max(shares)}, "holds": median >= TOP_SHARE})
    if "init_scale" in members:
        m = members["init_scale"]
        r, slope = _fit([runs[n]["decomposition"]["weight_norm"] for _, n in m],
                        [runs[n]["decomposition"]["sigma_w_total"] for _, n in m])
        out.append({"claim": f"σ_w grows with the weight norm (init-scale sweep: r ≥ {NORM_R}, slope > 0)",
                    "values": {"r": r, "slope": slope, "runs": len(m)}, "holds": bool(r >= NORM_R and slope > 0),
                    **({"caveat": "fewer than 3 runs"} if len(m) < 3 else {})})
    for sweep, rows in by_sweep.items():
        factor, sign = EXPECTED[sweep]
        trend = {}
        for name, key in FACTORS.items():
            means = [row[key]["mean"] for row in rows]
            rho = stats.spearmanr([row["value"] for row in rows], means)[0] if len(rows) >= 3 else math.nan
            change = means[-1] / means[0] - 1 if means[0] else math.nan
            trend[name] = (float(rho), float(change))
        rho, change = trend[factor]
        strong = (len(rows) < 3 or sign * rho >= TREND_RHO) and sign * change >= TREND_CHANGE
        out.append({"claim": f"{sweep} acts through {factor} ({'σ_g' if factor == 'sharpness' else 'σ_w'} "
                             f"{'grows' if sign > 0 else 'falls'} with it: Spearman ≥ {TREND_RHO}, change ≥ {TREND_CHANGE:.0%})",
                    "values": {f"{n} Spearman": t[0] for n, t in trend.items()}
                    | {f"{n} change": t[1] for n, t in trend.items()},
                    "holds": bool(strong), **({"caveat": "two grid points: the change alone"} if len(rows) < 3 else {})})
    return out

