"""``landscape-kernels reproduce noise-curvature``: the superlinear relation between SGD noise covariance
and curvature (Zhang, Yang & Tu 2026, arXiv 2602.05600); ``docs/reproductions/noise-curvature.md``.

For each loss (cross-entropy; MSE on the softmax outputs) and seed, the paper's network (784-50-50-10
ReLU, no bias) is trained on a class-balanced subset by SGD with a per-epoch cosine decay of the lr to
1/100 and gradient clipping; then, for the 50 x 50 hidden matrix W2 with the other layers fixed:

- the exact layer Hessian H and E_p[h_p^2] from the per-sample Kronecker factors (dense, 2500 x 2500);
- the minibatch covariance C over one shuffled pass (minibatch gradients from the fused kernels);
- gamma of C_ii ~ H_ii^gamma over H's top directions, the commutator against a random rotation, and
  the exponent of the predicted diagonal v_i^T E_p[h_p^2] v_i.

Each (loss, seed) run lives in ``OUT/{loss}_seed{seed}/``: ``checkpoint.pt`` while training
(``--resume`` continues it), then ``model.pt`` and ``result.json``.
"""
import copy
import os
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..analyses.noise_curvature import (
    hessian_second_moment, layer_factors, layer_hessian, minibatch_covariance, minibatch_gradients, mse_on_softmax,
    superlinear_relation)
from ..training.data import balanced_subset, load_dataset
from ..training.models import mlp
from ..training.state_files import load_state, save_state
from ..training.trainer import SGDTrainer, cosine_schedule
from .job import Job, data_dir_option, dataset_option, option
from .reports.noise_curvature import write_noise_curvature_report

LOSSES = {"ce": F.cross_entropy, "mse": mse_on_softmax}
COMMUTATOR_RATIO = 0.25  # "far below the random baseline": at most a quarter of it


@dataclass
class NoiseCurvatureConfig:
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    per_class: int = option(2000, "training samples per class (the paper: 2000)")
    hidden: int = 50
    param: str = "2.weight"
    batch_size: int = option(50, "SGD batch size B")
    lr: float = option(0.1, "initial lr, cosine decay to lr/100 over --epochs")
    final_lr_fraction: float = 0.01
    epochs: int = option(500, "epochs of training")
    clip: float = option(5.0, "gradient-norm clipping")
    losses: tuple = option(("ce", "mse"), "ce, mse (MSE on the softmax outputs)")
    seeds: tuple = option((0,), "seeds, one run per loss and seed (the paper: 4 seeds)", minimum=0)
    top: int = option(500, "top eigen-directions of H in the fit")
    quick: bool = option(False, "a short run on the embedded digits")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.per_class, c.hidden, c.epochs, c.top = "digits", 60, 12, 15, 60
        bad = [name for name in c.losses if name not in LOSSES]
        if bad or not c.losses:
            raise ValueError(f"losses must be a non-empty list of {sorted(LOSSES)}, got {c.losses}")
        if not c.seeds:
            raise ValueError("seeds must list at least one seed")
        if c.top > c.hidden * c.hidden:
            raise ValueError(f"top ({c.top}) exceeds the {c.hidden * c.hidden} weights of the hidden matrix")
        return c


def load_data(cfg):
    """(train x, y) balanced to ``per_class`` per class (seeded) and (test x, y)."""
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    counts = torch.bincount(y)
    if int(counts.min()) < cfg.per_class:
        raise ValueError(f"per_class {cfg.per_class} exceeds the smallest class of {cfg.dataset} "
                         f"({int(counts.min())} training samples)")
    x, y = balanced_subset(x, y, cfg.per_class, seed=0)
    return (x, y), load_dataset(cfg.dataset, "test", cfg.data_dir)


def train_one(cfg, folder, train, loss_name, seed, ctx):
    """The trained model of one (loss, seed) run (reloaded from ``model.pt`` when it exists)."""
    x, y = train
    model = mlp((x.shape[1], cfg.hidden, cfg.hidden, 10), bias=False, seed=seed)
    saved = os.path.join(folder, "model.pt")
    if ctx.resume and os.path.isfile(saved):
        state = load_state(saved, "noise-curvature")
        model.load_state_dict(state["model"])
        ctx.log(f"{folder}: trained before, reusing {saved}")
        return model, state["history"]
    steps = -(-x.shape[0] // cfg.batch_size)
    trainer = SGDTrainer(model, x, y, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, loss_fn=LOSSES[loss_name],
                         checkpoint=os.path.join(folder, "checkpoint.pt"),
                         checkpoint_seconds=ctx.checkpoint_seconds, clip_grad_norm=cfg.clip,
                         lr_schedule=cosine_schedule(cfg.lr, cfg.epochs, steps, cfg.final_lr_fraction))
    ctx.resume_training(trainer).run(max_epochs=cfg.epochs, stopping_rule=None, progress=ctx.progress)
    save_state({"model": model.state_dict(), "history": trainer.history}, saved)
    os.remove(trainer.checkpoint)
    return model, trainer.history


def measure(cfg, model, train, loss_name, seed):
    """The paper's measurement on the trained model: the relation and the stage timings."""
    loss_fn = LOSSES[loss_name]
    x, y = train
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    seconds = {}
    t = time.perf_counter()
    factors = layer_factors(model64, loss_fn, x64, y, cfg.param)
    H, second = layer_hessian(factors), hessian_second_moment(factors)
    seconds["hessians"] = time.perf_counter() - t
    t = time.perf_counter()
    C = minibatch_covariance(minibatch_gradients(model64, loss_fn, x64, y, cfg.param, cfg.batch_size, seed=seed))
    seconds["covariance"] = time.perf_counter() - t
    t = time.perf_counter()
    relation = superlinear_relation(H, C, top=cfg.top, second_moment=second, seed=seed)
    seconds["relation"] = time.perf_counter() - t
    return relation, seconds


def run_one(cfg, folder, train, test, loss_name, seed, ctx):
    """Train and measure one (loss, seed) run; its result dict."""
    t = time.perf_counter()
    model, history = train_one(cfg, folder, train, loss_name, seed, ctx)
    train_seconds = time.perf_counter() - t
    relation, seconds = measure(cfg, model, train, loss_name, seed)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    g = relation.gamma
    ctx.log(f"{os.path.basename(folder)}: gamma {g.exponent:.3f} +- {g.stderr:.3f} (R^2 {g.r2:.3f}, "
            f"{int(relation.used.sum())} directions), commutator {relation.commutator:.3g} vs random "
            f"{relation.random_commutator:.3g}, test accuracy {test_acc:.4f} ({time.perf_counter() - t:.0f} s)")
    return {"loss": loss_name, "seed": seed, "final_full_loss": history[-1]["full_loss"],
            "final_train_accuracy": history[-1]["full_accuracy"], "test_accuracy": test_acc,
            "training": history, "relation": relation.to_dict(), "seconds": {"training": train_seconds, **seconds}}


class NoiseCurvatureJob(Job):
    """the superlinear noise covariance-curvature relation C_ii ~ H_ii^gamma (Zhang, Yang & Tu 2026)"""

    name, config, report = "noise-curvature", NoiseCurvatureConfig, write_noise_curvature_report

    def compute(self, cfg, ctx):
        train, test = load_data(cfg)
        ctx.log(f"{cfg.dataset}: {train[0].shape[0]} training samples ({cfg.per_class} per class), network "
                f"{train[0].shape[1]}-{cfg.hidden}-{cfg.hidden}-10 no bias, B {cfg.batch_size}, lr {cfg.lr} cosine to "
                f"{cfg.lr * cfg.final_lr_fraction:g} over {cfg.epochs} epochs, clip {cfg.clip}; matrix {cfg.param}")
        runs = {}
        for loss_name in cfg.losses:
            for seed in cfg.seeds:
                name = f"{loss_name}_seed{seed}"
                folder = ctx.path(name)
                runs[name] = ctx.reuse(os.path.join(folder, "result.json"), label=folder,
                                       compute=lambda: run_one(cfg, folder, train, test, loss_name, seed, ctx))
        by = by_loss(runs)
        return {"runs": runs, "by_loss": by, "checks": checks(by)}

    def headline(self, s):
        return "gamma " + ", ".join(f"{loss} {b['gamma']['mean']:.3f}" for loss, b in s["by_loss"].items())


JOB = NoiseCurvatureJob()
run = JOB.run


def by_loss(runs):
    """Per loss: gamma, predicted gamma and the commutators, mean and spread over the seeds."""
    out = {}
    for loss_name in dict.fromkeys(r["loss"] for r in runs.values()):
        rs = [r["relation"] for r in runs.values() if r["loss"] == loss_name]

        def stat(values):
            values = [v for v in values if v is not None]
            return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values} if values else None

        out[loss_name] = {"seeds": len(rs), "gamma": stat([r["gamma"]["exponent"] for r in rs]),
                          "r2": stat([r["gamma"]["r2"] for r in rs]),
                          "predicted_gamma": stat([r["predicted"]["exponent"] for r in rs if "predicted" in r]),
                          "commutator": stat([r["commutator"] for r in rs]),
                          "random_commutator": stat([r["random_commutator"] for r in rs])}
    return out


def checks(by):
    """The paper's claims: gamma_CE in (1, 2] and above gamma_MSE, gamma_MSE in [0.8, 1.3], and the
    commutator far below the random-rotation baseline (at most ``COMMUTATOR_RATIO`` of it)."""
    out = []
    if "ce" in by:
        g = by["ce"]["gamma"]["mean"]
        out.append({"claim": "γ_CE in (1, 2]", "values": {"γ_CE": g}, "holds": 1 < g <= 2})
    if "mse" in by:
        g = by["mse"]["gamma"]["mean"]
        out.append({"claim": "γ_MSE in [0.8, 1.3]", "values": {"γ_MSE": g}, "holds": 0.8 <= g <= 1.3})
    if "ce" in by and "mse" in by:
        ce, mse = by["ce"]["gamma"]["mean"], by["mse"]["gamma"]["mean"]
        out.append({"claim": "γ_CE > γ_MSE", "values": {"γ_CE": ce, "γ_MSE": mse}, "holds": ce > mse})
    for name, b in by.items():
        c, rnd = b["commutator"]["mean"], b["random_commutator"]["mean"]
        out.append({"claim": f"{name}: ‖CH − HC‖/‖CH‖ far below a random rotation's (≤ {COMMUTATOR_RATIO:g}×)",
                    "values": {"commutator": c, "random": rnd}, "holds": c <= COMMUTATOR_RATIO * rnd})
    return out
