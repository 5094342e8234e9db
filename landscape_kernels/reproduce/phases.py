"""``landscape-kernels reproduce phases``: SGD's phases of learning with and without mislabeled data, and
cleaning by per-sample loss (Feng & Tu, Mach. Learn.: Sci. Technol. 2021, arXiv 2101.06509);
``docs/reproductions/phases.md``.

For each label-noise fraction rho, an MLP with the capacity to memorise the wrong labels is trained
by plain SGD on an MNIST subset in which a fraction rho of the labels is replaced by another class.
Every ``record_every`` epochs, at fixed weights: the test error, the training errors of the correctly
and wrongly labelled samples, every training sample's loss, the separation of the two groups' losses
(AUC), the alignment and amplitude of an ensemble of minibatch gradients and cos(g_c, g_w) and the
relative strength of the two groups' mean gradients (``analyses.phases``, from block means of the
fused per-sample Gram matrix). The phases come from the test-error curve by the rule of
``phase_boundaries``. For rho > 0 the samples of highest loss at the epoch of phase II where the
losses separate most are removed (the fraction ``clean_fraction``, default rho) and the network is
trained again from the same initialisation on the cleaned set.

Each run lives in ``OUT/rho{rho}/`` (and ``OUT/rho{rho}_cleaned/``): ``checkpoint.pt`` while it trains
(``--resume`` continues it), then ``result.json`` and ``losses.npz`` (the per-sample losses along training).
"""
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..analyses.phases import (
    clean_by_loss, disjoint_minibatches, ensemble_order, group_order, loss_separation_auc, per_sample_gram,
    phase_boundaries)
from ..capture.model import eval_mode
from ..training.data import balanced_subset, load_dataset, with_label_noise
from ..training.models import mlp
from ..training.trainer import SGDTrainer
from .job import Job, data_dir_option, dataset_option, option
from .reports.phases import write_phases_report

PHASE_NAMES = ("I (down)", "II (flat)", "III (up)", "IV (plateau)")
NOISE = (0.0, 0.1, 0.2, 0.4)


@dataclass
class PhasesConfig:
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    per_class: int = option(1000, "training samples per class (10,000 in all on MNIST)")
    test_size: int = option(10000, "test samples (the first ones of the test set)")
    hidden: int = option(256, "width of the two hidden layers (enough to memorise the wrong labels)")
    batch_size: int = option(100, "SGD batch size B")
    lr: float = option(0.1, "SGD learning rate")
    epochs: int = option(300, "epochs of training (long enough for the last phase)")
    noise: tuple = option(NOISE, "label-noise fractions rho, one run each (--quick: 0, 0.2)", minimum=0)
    record_every: int = option(2, "epochs between measurements")
    ensemble_batches: int = option(20, "minibatches M in the gradient ensemble (of size B)")
    group_samples: int = option(2000, "training samples in the correct/wrong gradient order parameters")
    clean_fraction: float = option(None, "fraction of highest-loss samples removed (default rho)", type=float)
    seed: int = option(0, "seed of the initialisation, the minibatch order and the label noise", minimum=0)
    quick: bool = option(False, "the embedded digits, a small MLP, 60 epochs: seconds")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.per_class, c.test_size, c.hidden, c.batch_size = "digits", 100, 359, 64, 50
            c.epochs, c.ensemble_batches, c.group_samples = 60, 10, 500
            c.noise = (0.0, 0.2) if c.noise == NOISE else c.noise
        if not c.noise or any(not 0 <= r < 1 for r in c.noise):
            raise ValueError(f"noise must list fractions in [0, 1), got {c.noise}")
        if c.clean_fraction is not None and not 0 < c.clean_fraction < 1:
            raise ValueError(f"clean_fraction must be in (0, 1), got {c.clean_fraction}")
        if c.ensemble_batches < 2:
            raise ValueError(f"ensemble_batches must be at least 2 (the alignment is a mean over pairs), got {c.ensemble_batches}")
        return c


def load_data(cfg, rho):
    """((x, noisy y), wrong mask, (test x, y)): ``per_class`` samples per class, a fraction rho of them
    given another class (seeded)."""
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    x = x.reshape(x.shape[0], -1)
    if int(torch.bincount(y).min()) < cfg.per_class:
        raise ValueError(f"per_class {cfg.per_class} exceeds the smallest class of {cfg.dataset} "
                         f"({int(torch.bincount(y).min())} training samples)")
    x, y = balanced_subset(x, y, cfg.per_class, seed=0)
    noisy, wrong = with_label_noise(y, rho, num_classes=10, seed=cfg.seed + 1)
    xt, yt = load_dataset(cfg.dataset, "test", cfg.data_dir)
    return (x, noisy), wrong, (xt.reshape(xt.shape[0], -1)[: cfg.test_size], yt[: cfg.test_size])


class PhaseRecorder:
    """Measures at fixed weights every ``every`` epochs (``after_epoch``) and keeps the per-sample
    training losses; its state goes into the trainer's checkpoint, its scalars into the history."""

    def __init__(self, cfg, model, train, wrong, test, orders=True):
        self.cfg, self.model, self.train, self.wrong, self.test, self.orders = cfg, model, train, wrong, test, orders
        g = torch.Generator().manual_seed(cfg.seed + 2)
        n = train[0].shape[0]
        self.group_rows = torch.randperm(n, generator=g)[: min(cfg.group_samples, n)].sort().values
        self.epochs, self.losses = [], []

    def after_epoch(self, trainer, record):
        if (record["epoch"] + 1) % self.cfg.record_every:
            return
        record.update(self.measure(record["epoch"] + 1))

    def measure(self, epoch):
        x, y = self.train
        out = {"measured": True}
        with torch.no_grad(), eval_mode(self.model):
            xt, yt = self.test
            out["test_error"] = float((self.model(xt).argmax(1) != yt).double().mean())
            logits = self.model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            miss = logits.argmax(1) != y
        self.epochs.append(epoch)
        self.losses.append(losses.float().cpu())
        c, w = ~self.wrong, self.wrong
        out["train_error_correct"] = float(miss[c].double().mean())
        out["loss_correct"] = float(losses[c].mean())
        if bool(w.any()):
            out["train_error_wrong"] = float(miss[w].double().mean())  # against the wrong labels: memorisation
            out["loss_wrong"] = float(losses[w].mean())
            out["auc"] = loss_separation_auc(losses, w)
        if self.orders:
            B, M = self.cfg.batch_size, self.cfg.ensemble_batches
            batches = disjoint_minibatches(x.shape[0], B, M, seed=self.cfg.seed * 100003 + epoch)
            rows = batches.reshape(-1)
            gram = per_sample_gram(self.model, F.cross_entropy, x[rows], y[rows])
            out.update({f"ensemble_{k}": v for k, v in
                        ensemble_order(gram, torch.arange(len(rows)).reshape(M, B)).to_dict().items()
                        if k in ("alignment", "amplitude")})
            gw = self.wrong[self.group_rows]
            if bool(gw.any()) and bool((~gw).any()):
                gram = per_sample_gram(self.model, F.cross_entropy, x[self.group_rows], y[self.group_rows])
                g = group_order(gram, gw)
                out.update({"cos_cw": g.cosine, "strength_wc": g.strength})
        return out

    def state_dict(self):
        return {"epochs": self.epochs, "losses": self.losses}

    def load_state_dict(self, state):
        self.epochs, self.losses = list(state["epochs"]), list(state["losses"])


def train_run(cfg, folder, train, wrong, test, ctx, orders=True):
    """Train one run with its recorder; (history records that were measured, epochs, losses (T, N))."""
    x, y = train
    model = mlp((x.shape[1], cfg.hidden, cfg.hidden, 10), bias=True, seed=cfg.seed)
    recorder = PhaseRecorder(cfg, model, train, wrong, test, orders)
    os.makedirs(folder, exist_ok=True)
    trainer = SGDTrainer(model, x, y, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, callbacks=[recorder],
                         checkpoint=os.path.join(folder, "checkpoint.pt"), checkpoint_seconds=ctx.checkpoint_seconds)
    ctx.resume_training(trainer).run(max_epochs=cfg.epochs, stopping_rule=None, progress=ctx.progress)
    records = [{k: v for k, v in r.items() if k != "measured"} for r in trainer.history if r.get("measured")]
    return records, np.array(recorder.epochs), torch.stack(recorder.losses).numpy(), trainer.checkpoint


def analyse_run(records, epochs, losses, wrong):
    """The phases of a run's test-error curve and, with mislabels, where the losses separate most."""
    errors = [r["test_error"] for r in records]
    phases = phase_boundaries(errors)
    out = {"phases": phases.to_dict(), "phase_epochs": [int(epochs[i]) for i in phases.starts],
           "final_test_error": errors[-1], "best_test_error": min(errors),
           "best_epoch": int(epochs[int(np.argmin(errors))])}
    if bool(wrong.any()):
        auc = np.array([r["auc"] for r in records])
        peak = int(auc.argmax())
        out["auc_peak"] = {"epoch": int(epochs[peak]), "auc": float(auc[peak]), "phase": phase_of(phases.starts, peak)}
        # the cleaning time: the largest separation inside phase II (the whole run without one)
        lo, hi = (phases.starts[1], phases.starts[2] if phases.count > 2 else len(errors)) if phases.count > 1 else (0, len(errors))
        at = lo + int(auc[lo:hi].argmax()) if hi > lo else peak
        out["clean_at"] = {"record": at, "epoch": int(epochs[at]), "auc": float(auc[at]), "phase": phase_of(phases.starts, at)}
    return out


def phase_of(starts, index):
    """The phase (0-based) a record index falls in."""
    return max(i for i, s in enumerate(starts) if s <= index)


def run_rho(cfg, rho, ctx):
    """The noisy run at ``rho`` and, for rho > 0, its cleaned run; the result dict."""
    t0 = time.perf_counter()
    train, wrong, test = load_data(cfg, rho)
    folder = ctx.path(f"rho{rho:g}")
    records, epochs, losses, checkpoint = train_run(cfg, folder, train, wrong, test, ctx)
    np.savez(os.path.join(folder, "losses.tmp.npz"), epochs=epochs, losses=losses, wrong=wrong.numpy())
    os.replace(os.path.join(folder, "losses.tmp.npz"), os.path.join(folder, "losses.npz"))
    result = {"rho": rho, "mislabeled": int(wrong.sum()), "records": records, **analyse_run(records, epochs, losses, wrong)}
    if rho > 0:
        at = result["clean_at"]["record"]
        cleaning = clean_by_loss(losses[at], wrong, cfg.clean_fraction if cfg.clean_fraction is not None else rho)
        keep = torch.ones(len(wrong), dtype=torch.bool)
        keep[cleaning.removed] = False
        cleaned_records, _, _, cleaned_checkpoint = train_run(cfg, ctx.path(f"rho{rho:g}_cleaned"),
                                                              (train[0][keep], train[1][keep]), wrong[keep], test, ctx,
                                                              orders=False)
        os.remove(cleaned_checkpoint)
        errors = [r["test_error"] for r in cleaned_records]
        result["cleaning"] = {**cleaning.to_dict(), "epoch": result["clean_at"]["epoch"],
                              "left_mislabeled": int(wrong[keep].sum()), "final_test_error": errors[-1],
                              "best_test_error": min(errors), "test_error": errors}
    os.remove(checkpoint)  # the run is done: result.json and losses.npz hold what it measured
    result["seconds"] = time.perf_counter() - t0
    p = result["phase_epochs"]
    ctx.log(f"rho {rho:g}: {len(p)} phases starting at epochs {p}, test error final {result['final_test_error']:.4f} "
            f"(best {result['best_test_error']:.4f})" + (
                f"; cleaned at epoch {result['cleaning']['epoch']}: precision {result['cleaning']['precision']:.3f}, "
                f"recall {result['cleaning']['recall']:.3f}, final test error {result['cleaning']['final_test_error']:.4f}"
                if "cleaning" in result else "") + f" ({result['seconds']:.0f} s)")
    return result


class PhasesJob(Job):
    """phases of learning with mislabeled data from the minibatch-gradient order parameters, and cleaning by
    per-sample loss (Feng & Tu 2021)"""

    name, config, report = "phases", PhasesConfig, write_phases_report

    def compute(self, cfg, ctx):
        ctx.log(f"{cfg.dataset}: {cfg.per_class} per class, MLP in-{cfg.hidden}-{cfg.hidden}-10, SGD B {cfg.batch_size}, "
                f"lr {cfg.lr}, {cfg.epochs} epochs, rho {list(cfg.noise)}, measured every {cfg.record_every} epochs")
        runs, arrays = {}, {}
        for rho in cfg.noise:
            name = f"rho{rho:g}"
            runs[name] = ctx.reuse(ctx.path(name, "result.json"), label=name, compute=lambda: run_rho(cfg, rho, ctx))
            path = ctx.path(name, "losses.npz")
            if os.path.isfile(path):
                with np.load(path, allow_pickle=False) as f:
                    arrays[name] = {k: f[k] for k in f.files}
        return {"runs": runs, "checks": checks(runs)}, arrays

    def headline(self, s):
        return f"{sum(c['holds'] for c in s['checks'])} of {len(s['checks'])} claims hold"


JOB = PhasesJob()
run = JOB.run


def checks(runs):
    out = []
    for name, r in runs.items():
        count, rho = r["phases"]["starts"], r["rho"]
        if rho == 0:
            out.append({"claim": "ρ = 0: two phases (test error down, then flat)",
                        "values": {"phases": len(count), "rise": r["phases"]["rise"]}, "holds": len(count) == 2})
            continue
        out.append({"claim": f"ρ = {rho:g}: four phases (test error down, flat, up, plateau)",
                    "values": {"phases": len(count), "starting at epochs": r["phase_epochs"], "rise": r["phases"]["rise"]},
                    "holds": len(count) == 4})
        peak = r["auc_peak"]
        out.append({"claim": f"ρ = {rho:g}: the two groups' losses separate most in phase II",
                    "values": {"peak AUC": peak["auc"], "at epoch": peak["epoch"], "in phase": PHASE_NAMES[peak["phase"]]},
                    "holds": peak["phase"] == 1 and len(count) >= 3})
        c = r["cleaning"]
        out.append({"claim": f"ρ = {rho:g}: cleaning in phase II improves the final test error",
                    "values": {"cleaned": c["final_test_error"], "noisy final": r["final_test_error"],
                               "noisy best": r["best_test_error"], "precision": c["precision"], "recall": c["recall"]},
                    "holds": c["final_test_error"] < r["final_test_error"]})
    return out
