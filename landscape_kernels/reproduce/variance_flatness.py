"""``landscape-kernels reproduce variance-flatness``: Feng & Tu's inverse variance-flatness relation.

Feng & Tu, "The inverse variance-flatness relation in stochastic gradient descent is critical for
finding flat minima", PNAS 118 (2021); definitions in ``docs/methods.md``, results in
``docs/reproductions/variance-flatness.md``.

Stages, each timed: training (SGD, heavy-ball momentum or Adam, with a snapshot of the analysed weight
matrix, W2 by default, before every step kept for the last ``window`` steps, and the whole model at
every epoch end), PCA, flatness (with the loss profiles), MLF ensemble,
active temperature. The run folder holds ``checkpoint.pt`` (resumable with ``--resume``),
``summary.json``, the figures and ``report.md``. ``--grid`` runs every (B, lr) of a grid into
subfolders and overlays them.
"""
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..analyses.fits import power_law_fit
from ..analyses.variance_flatness import (active_temperature, flatness_along_pcs, mlf_ensemble, psi_fit,
                                          trajectory_pca)
from ..linalg.profiles import loss_profiles
from ..training.callbacks import EpochStates, WindowRecorder
from ..training.data import load_dataset
from ..training.sharpness import training_subset
from ..training.models import mlp
from ..training.optim import OPTIMIZERS, build_optimizer
from ..training.trainer import InstabilityGuard, SGDTrainer, StoppingRule
from ..version import __version__
from .job import (Job, comma_list, config_from_args, data_dir_option, dataset_option, option, read_json,
                  write_json)
from .reports.variance_flatness import write_grid_report, write_variance_flatness_report

PAPER_LAYER = 2  # W2, the hidden -> hidden matrix the paper analyses
DEFAULT_LRS = {"sgd": 0.1, "momentum": 0.01, "adam": 0.001}  # momentum: the same lr / (1 - mu) as SGD's 0.1

# The checkable numbers of the paper's system (MNIST, B = 50, lr = 0.1), docs/methods.md
MNIST_CHECKS = {"gamma": (2.0, 3.2, "2-3"), "n90": (20, 60, "≈ 35"), "psi": (3.5, 5.0, "≈ 4"),
                "cos_p1_mean": (0.8, 1.0, "≈ 0.9"), "ratio_12": (10.0, float("inf"), "≫ 1")}
GRID_BATCH_SIZES = (25, 50, 100)
GRID_LRS = (0.05, 0.1, 0.2)


@dataclass
class VarianceFlatnessConfig:
    dataset: str = dataset_option("digits", "digits: the embedded scikit-learn 8x8 digits (offline, minutes on 2 "
                                            "cores); mnist: the paper's data")
    data_dir: str = data_dir_option()
    batch_size: int = option(50, "SGD batch size B")
    lr: float = option(None, "learning rate (default 0.1 for sgd, 0.01 for momentum, 0.001 for adam)", type=float)
    optimizer: str = option("sgd", "sgd: plain SGD (the paper); momentum: heavy-ball SGD (--momentum); adam: Adam "
                                   "(--betas); none with weight decay", choices=OPTIMIZERS)
    momentum: float = option(0.9, "momentum of --optimizer momentum")
    betas: tuple = option((0.9, 0.999), "Adam's (beta1, beta2) for --optimizer adam", minimum=0)
    hidden: tuple = option((50, 50), "hidden widths of the ReLU network without biases (the paper: 50,50)")
    layer: int = option(PAPER_LAYER, "which weight matrix is analysed: 1 = input -> first hidden, 2 = W2 (the paper), "
                                     "..., len(hidden) + 1 = the output layer")
    train_samples: int = option(None, "train on a seeded random subset of this size (default: the whole set)", type=int)
    window: int = option(None, "snapshots of the analysed matrix in the PCA window (default 12000 on MNIST, 6000 on "
                               "digits)", type=int)
    max_epochs: int = option(1000, "epochs at most (the stopping rule usually ends training earlier)")
    seed: int = option(0, "seed of the initialisation and the minibatch order", minimum=0)
    pcs_every: int = option(10, "analyse PCs 1, 1+k, 1+2k, ...")
    gamma_max_pc: int = option(1000, "upper end of the gamma fit over PCs 20.. (the paper fixes only the lower end)")
    profile_pcs: tuple = (1, 11, 101, 1001)  # loss profiles, parabola MLF and T(delta) profiles
    mlf_minibatches: int = 100
    temperature_offsets: int = 11  # points of T_i(delta) in [-F_i / 2, F_i / 2]
    temperature_samples: int = 10000  # samples for T(t) along training
    center: str = option("final", "flatness from w0 (final weights) or from <w> (the window mean)",
                         choices=("final", "mean"))
    device: str = option("cpu", "torch device of training and analysis")
    stop_accuracy: float = 0.99
    stop_loss: float = 5e-5
    stop_window: int = 9
    instability_drop: float = 0.02  # roll back and stop when full accuracy stays this far below its best (None: off)
    instability_patience: int = 3  # ... for this many epochs
    quick: bool = option(False, "a short smoke run of the whole pipeline")

    def resolved(self):
        c = replace(self)
        if c.lr is None:
            c.lr = DEFAULT_LRS.get(c.optimizer, 0.1)
        if c.window is None:
            c.window = 12000 if c.dataset == "mnist" else 6000
        if c.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer (--optimizer) must be one of {OPTIMIZERS}, got {c.optimizer!r}")
        if not 1 <= c.layer <= len(c.hidden) + 1:
            raise ValueError(f"layer (--layer) must be 1..{len(c.hidden) + 1} for hidden widths {c.hidden}, got {c.layer}")
        if c.quick:  # a smoke run of the whole pipeline in well under a minute
            c.max_epochs, c.window, c.pcs_every = min(c.max_epochs, 40), min(c.window, 800), max(c.pcs_every, 40)
            c.mlf_minibatches, c.temperature_offsets, c.temperature_samples = 12, 5, 500
        if c.center not in ("final", "mean"):
            raise ValueError(f"center must be 'final' or 'mean', got {c.center!r}")
        return c


def layer_name(layer):
    """The parameter name of weight matrix ``layer`` (1-based) in ``training.models.mlp``: Linear layers sit
    at every other index of its Sequential, between the activations."""
    return f"{2 * (layer - 1)}.weight"


def network(cfg, num_features):
    return mlp((num_features, *cfg.hidden, 10), seed=cfg.seed)


def is_reference_system(cfg):
    """The paper's system, where its numerical tolerances apply: plain SGD on the full set, 50-50, W2."""
    return (cfg.optimizer == "sgd" and tuple(cfg.hidden) == (50, 50) and cfg.layer == PAPER_LAYER
            and cfg.train_samples is None)


def _train(cfg, x, y, ctx):
    model = network(cfg, x.shape[1])
    window = WindowRecorder(model, [layer_name(cfg.layer)], cfg.window)
    epochs = EpochStates(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, momentum=cfg.momentum, betas=cfg.betas)
    trainer = SGDTrainer(model, x, y, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                         optimizer=optimizer,
                         callbacks=[window, epochs], checkpoint=ctx.path("checkpoint.pt"),
                         checkpoint_seconds=ctx.checkpoint_seconds)
    ctx.resume_training(trainer)
    rule = StoppingRule(cfg.stop_window, cfg.stop_accuracy, cfg.stop_loss)
    guard = None if cfg.instability_drop is None else InstabilityGuard(cfg.instability_drop, cfg.instability_patience)
    with ctx.timer("training"):
        if trainer.history and rule.satisfied(trainer.history):
            trainer.stopped_by = "stopping_rule"  # a checkpoint from before stopped_by was saved
        elif not (trainer.history and trainer.stopped_by == "unstable"):
            trainer.run(max_epochs=cfg.max_epochs, stopping_rule=rule, progress=ctx.progress, guard=guard)
    return model.cpu(), trainer, window, epochs


def analyse(cfg, model, x, y, window, epochs, history, timer, log=print):
    """Every quantity of the paper's analysis from a trained model and its recorded window; returns the summary
    dict and the arrays the figures need."""
    data = (x, y)
    param = layer_name(cfg.layer)
    steps, snaps = window.snapshots()
    with timer("pca"):
        pca = trajectory_pca(snaps, gamma_range=(20, cfg.gamma_max_pc))
        rank = int((pca.variances > 1e-12 * pca.variances[0]).sum())
        gamma_by_end = _gamma_by_upper_end(pca.variances, rank)
        pcs = list(range(1, rank + 1, cfg.pcs_every))
        theta = pca.project(snaps, [1, 2, min(10, rank), min(20, rank)])
    log(f"PCA of {snaps.shape[0]} snapshots: gamma = {pca.gamma:.2f}, n90 = {pca.n90}, cos(p1, <w>) = "
        f"{pca.cos_p1_mean:.3f}; {len(pcs)} PCs analysed")
    comps = pca.components.float()
    w_shape = dict(model.named_parameters())[param].shape
    with timer("flatness"):
        center = None if cfg.center == "final" else pca.mean.float()
        flat = flatness_along_pcs(model, F.cross_entropy, data, comps, pcs, param=param, center=center)
        psi = psi_fit(pca.variances, pcs, flat)
        # the analysed PC nearest each requested profile PC (PCs beyond the rank have no variance)
        prof_pcs = sorted({min(pcs, key=lambda q: abs(q - p)) for p in cfg.profile_pcs})
        half = float(flat.widths.max())
        deltas = torch.linspace(-half, half, 41, dtype=torch.float64)
        profiles = loss_profiles(model, F.cross_entropy, data, comps[[p - 1 for p in prof_pcs]], deltas, params=[param])
    log(f"flatness: psi = {psi.psi:.2f} (95 % CI {-psi.fit.ci95[1]:.2f} .. {-psi.fit.ci95[0]:.2f}) over {len(psi.pcs)} PCs")
    dirs = comps[[p - 1 for p in pcs]].reshape(len(pcs), *w_shape)
    widths = {p: float(w) for p, w in zip(pcs, flat.widths)}
    with timer("mlf"):
        count = min(cfg.mlf_minibatches, x.shape[0] // cfg.batch_size)
        mlf = mlf_ensemble(model, F.cross_entropy, x, y, dirs, cfg.batch_size, count, cfg.seed, param)
        prof_dirs = dirs[[pcs.index(p) for p in prof_pcs]]
        halfwidths = torch.tensor([widths[p] / 4 for p in prof_pcs], dtype=torch.float64)
        mlf_parabola = mlf_ensemble(model, F.cross_entropy, x, y, prof_dirs, cfg.batch_size, count, cfg.seed, param,
                                    method="parabola", halfwidth=halfwidths)
    with timer("temperature"):
        T0 = active_temperature(model, F.cross_entropy, x, y, dirs, cfg.lr, cfg.batch_size, param=param)[:, 0]
        unit = torch.linspace(-0.5, 0.5, cfg.temperature_offsets, dtype=torch.float64)
        T_profiles = torch.stack([active_temperature(model, F.cross_entropy, x, y, prof_dirs[j : j + 1], cfg.lr,
                                                     cfg.batch_size, offsets=(unit * widths[p]).tolist(), param=param)[0]
                                  for j, p in enumerate(prof_pcs)])
        sub = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.temperature_samples]
        T_t = []
        probe = network(cfg, x.shape[1])
        for _, _, params in epochs.states:
            probe.load_state_dict(params)
            T_t.append(active_temperature(probe, F.cross_entropy, x[sub], y[sub], prof_dirs, cfg.lr, cfg.batch_size,
                                          param=param)[:, 0])
        T_t = torch.stack(T_t) if T_t else torch.empty(0, len(prof_pcs), dtype=torch.float64)
    loss_t = np.array([r["full_loss"] for r in history])
    corr = float(np.corrcoef(np.log(loss_t), np.log(T_t.mean(1).numpy()))[0, 1]) if len(loss_t) > 2 else float("nan")
    t_fit_keep = ~flat.saturated_left & ~flat.saturated_right & (torch.tensor(pcs) != 1)
    summary = {
        "pca": {**pca.to_dict(), "rank": rank, "gamma_by_upper_end": gamma_by_end,
                "window_steps": [int(steps[0]), int(steps[-1])] if len(steps) else []},
        "pcs": pcs,
        "flatness": {**flat.to_dict(), "center": cfg.center},
        "psi": psi.to_dict(),
        "profiles": {"pcs": prof_pcs, "deltas": deltas.tolist(), "losses": profiles.tolist()},
        "mlf": {"derivatives": mlf.to_dict(), "parabola": {**mlf_parabola.to_dict(), "pcs": prof_pcs}},
        "temperature": {"T0": T0.tolist(), "profile_pcs": prof_pcs, "offsets_per_width": unit.tolist(),
                        "profiles": T_profiles.tolist(), "along_training": T_t.tolist(),
                        "along_training_samples": int(len(sub)), "corr_log_T_log_L": corr,
                        "T0_vs_F_exponent": _exponent(flat.widths[t_fit_keep], T0[t_fit_keep])},
    }
    arrays = {"theta": theta, "steps": steps, "loss_t": loss_t}
    return summary, arrays


def _gamma_by_upper_end(variances, rank, ends=(100, 200, 500, 1000, 2000)):
    """gamma fitted over PCs 20..end for several ends and the whole rank: how the fit range matters."""
    out = {}
    for end in sorted({e for e in ends if 22 < e < rank} | {rank}):
        if end <= 22:
            continue
        i = np.arange(20, end + 1)
        out[str(end)] = -power_law_fit(i, variances[19:end].numpy()).exponent
    return out


def _exponent(x, y):
    ok = (y > 0) & (x > 0)
    if int(ok.sum()) < 3:
        return None
    return power_law_fit(x[ok].numpy(), y[ok].numpy()).to_dict()


def checks(summary, dataset, reference=True):
    """The checkable numbers beside the paper's values, each marked within or outside its tolerance; the
    numerical tolerances apply on MNIST at the paper's system (``reference``), psi > 0 everywhere."""
    values = {"gamma": summary["pca"]["gamma"], "n90": summary["pca"]["n90"], "psi": summary["psi"]["psi"],
              "cos_p1_mean": summary["pca"]["cos_p1_mean"], "ratio_12": summary["pca"]["ratio_12"]}
    rows = []
    for key, (lo, hi, paper) in MNIST_CHECKS.items():
        rows.append({"quantity": key, "value": values[key], "paper": paper, "tolerance": [lo, hi],
                     "within": bool(lo <= values[key] <= hi), "applies": dataset == "mnist" and reference})
    rows.append({"quantity": "psi > 0", "value": values["psi"], "paper": "> 0", "tolerance": [0.0, float("inf")],
                 "within": bool(values["psi"] > 0), "applies": True})
    return rows


class VarianceFlatnessJob(Job):
    """Feng & Tu's inverse variance-flatness relation (PNAS 2021): PCA, flatness, MLF, active temperature"""

    name, config, report = "variance-flatness", VarianceFlatnessConfig, write_variance_flatness_report

    def compute(self, cfg, ctx):
        timer, log = ctx.timer, ctx.log
        torch.manual_seed(cfg.seed)
        with timer("data"):
            x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
            x_test, y_test = load_dataset(cfg.dataset, "test", cfg.data_dir)
            x, y = training_subset(x, y, cfg.train_samples, cfg.seed)
        log(f"{cfg.dataset}: {x.shape[0]} training images of {x.shape[1]} pixels; {cfg.optimizer}, B = {cfg.batch_size}, "
            f"lr = {cfg.lr}; hidden {','.join(map(str, cfg.hidden))}, analysing weight matrix {cfg.layer} "
            f"({layer_name(cfg.layer)})")
        model, trainer, window, epochs = _train(cfg, x, y, ctx)
        last = trainer.history[-1] if trainer.history else {}
        if trainer.instability is not None:
            u = trainer.instability
            accuracies = ", ".join(f"{r['full_accuracy']:.4f}" for r in u)
            log(f"SGD turned unstable: full accuracy {accuracies} in epochs {u[0]['epoch']}-{u[-1]['epoch']}; "
                f"rolled back to the end of epoch {u[0]['epoch'] - 1} and analysing that window")
        log(f"trained {len(trainer.history)} epochs ({trainer.step} steps, stopped by {trainer.stopped_by or 'checkpoint'}): "
            f"full loss {last.get('full_loss', float('nan')):.3g}, training accuracy {last.get('train_accuracy') or 0:.4f}")
        summary, arrays = analyse(cfg, model, x, y, window, epochs, trainer.history, timer, log)
        test_loss, test_acc = trainer.evaluate(x_test, y_test)
        summary.update({
            "dataset": cfg.dataset,
            "training": {"epochs": len(trainer.history), "steps": trainer.step, "stopped_by": trainer.stopped_by,
                         "instability": trainer.instability,
                         "history": trainer.history, "test_loss": test_loss, "test_accuracy": test_acc},
        })
        summary["analysed_parameter"] = layer_name(cfg.layer)
        summary["checks"] = checks(summary, cfg.dataset, is_reference_system(cfg))
        return summary, arrays

    def headline(self, s):
        return f"gamma {s['pca']['gamma']:.2f}, n90 {s['pca']['n90']}, psi {s['psi']['psi']:.2f}"

    def add_arguments(self, parser):
        parser.add_argument("--grid", action="store_true",
                            help="run every (B, lr) of --grid-batch-sizes x --grid-lrs into OUT/B{B}_lr{lr}/ and "
                                 "overlay them")
        parser.add_argument("--grid-batch-sizes", type=comma_list(int), default=GRID_BATCH_SIZES,
                            help="comma list (default: 25,50,100)")
        parser.add_argument("--grid-lrs", type=comma_list(float), default=GRID_LRS, help="comma list (default: 0.05,0.1,0.2)")

    def main(self, args):
        if not args.grid:
            return super().main(args)
        g = run_grid(config_from_args(self.config, args), args.out, args.grid_batch_sizes, args.grid_lrs,
                     resume=args.resume, progress=not args.no_progress, checkpoint_seconds=args.checkpoint_every)
        print(f"report: {args.out}/grid.md  (psi " + ", ".join(f"{r['psi']:.2f}" if "psi" in r else "failed"
                                                             for r in g["settings"]) + ")")
        return 0


JOB = VarianceFlatnessJob()
run = JOB.run


def run_grid(cfg, out, batch_sizes=GRID_BATCH_SIZES, lrs=GRID_LRS, resume=False, progress=False, log=print,
             checkpoint_seconds=60.0):
    """The pipeline for every (B, alpha) of the grid, each in ``out/B{B}_lr{alpha}/`` (resumable one by
    one; with ``resume`` a setting with its summary.json is reused as it is), then ``grid.json``, the
    sigma^2-vs-F overlay ``fig_grid.png`` and ``grid.md`` with psi per setting (the paper: the relation
    holds for different B and alpha)."""
    if not batch_sizes or not lrs:
        raise ValueError("run_grid: batch_sizes and lrs must each list at least one value")
    os.makedirs(out, exist_ok=True)
    rows = []
    for B in batch_sizes:
        for lr in lrs:
            folder = f"B{int(B)}_lr{float(lr):g}"
            log(f"--- grid setting B = {B}, lr = {lr} -> {folder}")
            finished = os.path.join(out, folder, "summary.json")  # each run writes its own
            try:
                if resume and os.path.isfile(finished):  # a resumed grid reuses the settings it finished
                    log(f"{folder}: done before, reusing {finished}")
                    s = read_json(finished)
                else:
                    s = run(replace(cfg, batch_size=int(B), lr=float(lr)), os.path.join(out, folder), resume=resume,
                            progress=progress, log=log, checkpoint_seconds=checkpoint_seconds)
            except (ValueError, FloatingPointError) as exc:  # one failed setting must not lose the others
                log(f"grid setting B = {B}, lr = {lr} failed: {exc}")
                rows.append({"batch_size": int(B), "lr": float(lr), "folder": folder,
                             "error": f"{type(exc).__name__}: {exc}"})
                continue
            pcs = s["pcs"]
            rows.append({"batch_size": int(B), "lr": float(lr), "folder": folder, "psi": s["psi"]["psi"],
                         "psi_ci95": [-s["psi"]["fit"]["ci95"][1], -s["psi"]["fit"]["ci95"][0]],
                         "gamma": s["pca"]["gamma"], "n90": s["pca"]["n90"], "pcs": pcs,
                         "variances": [s["pca"]["variances"][p - 1] for p in pcs],
                         "widths": s["flatness"]["widths"],
                         "saturated": [a or b for a, b in zip(s["flatness"]["saturated_left"],
                                                              s["flatness"]["saturated_right"])],
                         "epochs": s["training"]["epochs"], "stopped_by": s["training"]["stopped_by"],
                         "test_accuracy": s["training"]["test_accuracy"]})
    grid = {"dataset": cfg.dataset, "settings": rows,
            "all_psi_positive": all("psi" in r and r["psi"] > 0 for r in rows),
            "library_version": __version__}
    write_grid_report(out, grid)
    write_json(os.path.join(out, "grid.json"), grid)
    return grid
