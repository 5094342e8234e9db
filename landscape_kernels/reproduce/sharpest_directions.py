"""``landscape-kernels reproduce sharpest-directions``: Jastrzębski et al., "On the relation between the
sharpest directions of DNN loss and the SGD step length" (ICLR 2019); ``docs/reproductions/sharpest-directions.md``.

Plain SGD (no momentum, constant lr) over the lr grid at one batch size and the batch-size grid at one
lr, with the top-K Hessian eigenvalues of the training loss tracked on a fixed subset every
``measure_examples`` training examples; the decomposed step and the cross-sections at the first
``step_analyses`` measurements. The report checks the paper's claims: the peak of lambda_1 falls
with lr and rises with B, and early in training the gamma = 1 step along e_1 does not decrease the loss
while gamma <= 0.5 does.
"""
import time
from dataclasses import dataclass, replace

from ..analyses.sharpest import early_e1_changes
from .job import Job, option, strictly_monotone
from .reports.sharpness import write_sharpest_directions_report
from .tracked import TrackedConfig, load_data, train_tracked


@dataclass
class SharpestDirectionsConfig(TrackedConfig):
    lrs: tuple = option((0.1, 0.01, 0.001), "the lr grid, at B = --lr-grid-batch-size")
    lr_grid_batch_size: int = option(128, "B of the lr grid")
    batch_sizes: tuple = option((8, 128, 1024), "the B grid, at lr = --batch-grid-lr")
    batch_grid_lr: float = option(0.05, "lr of the B grid")
    measure_examples: int = option(3000, "measure every this many training examples during the first --dense-epochs")
    dense_epochs: int = option(1, "epochs of dense measurements, then one at the start of every epoch", minimum=0)
    step_analyses: int = option(4, "decomposed step and cross-sections at the first this many measurements", minimum=0)

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.model, c.lrs, c.batch_sizes, c.epochs = "digits", "mlp", (0.1, 0.01), (16, 256), 4
            c.subset, c.k, c.measure_examples, c.step_analyses = 256, 3, 400, 2
        return c


def settings(cfg):
    """[(group, B, lr)]: the lr grid, then the B grid (a setting in both is run once, listed in both)."""
    return ([("lr", cfg.lr_grid_batch_size, float(lr)) for lr in cfg.lrs]
            + [("batch", int(B), cfg.batch_grid_lr) for B in cfg.batch_sizes])


def folder_name(B, lr):
    return f"B{int(B)}_lr{float(lr):g}"


class SharpestDirectionsJob(Job):
    """lambda_1 along training over lr and B grids, the decomposed step (Jastrzebski et al., ICLR 2019)"""

    name, config, report = "sharpest-directions", SharpestDirectionsConfig, write_sharpest_directions_report

    def compute(self, cfg, ctx):
        log = ctx.log
        train, test, subset = load_data(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.subset, cfg.seed)
        log(f"{cfg.dataset}: {train[0].shape[0]} training samples, Hessian subset {subset[0].shape[0]}, model {cfg.model}")
        runs, rows = {}, []
        for group, B, lr in settings(cfg):
            name = folder_name(B, lr)
            if name not in runs:
                every = max(1, round(cfg.measure_examples / B))
                log(f"--- B = {B}, lr = {lr}: {cfg.epochs} epochs, top-{cfg.k} eigenpairs every {every} steps for "
                    f"{cfg.dense_epochs} epoch(s), then every epoch")
                t = time.perf_counter()
                runs[name] = r = train_tracked(ctx, ctx.path(name), train, test, subset, model_name=cfg.model,
                                               batch_size=B, lr=lr, epochs=cfg.epochs, k=cfg.k, every=every,
                                               seed=cfg.seed, tol=cfg.tol, dense_epochs=cfg.dense_epochs,
                                               step_analyses=cfg.step_analyses,
                                               frobenius_probes=cfg.frobenius_probes)
                log(f"    peak lambda_1 {r['peak_lambda1']:.4g} at epoch {r['peak_epoch']:.2f} (lr lambda_1 "
                    f"{r['peak_lr_lambda1']:.3g}), final {r['final_lambda1']:.4g}, test accuracy {r['test_accuracy']:.4f} "
                    f"({time.perf_counter() - t:.0f} s)")
            rows.append({"group": group, "folder": name, "batch_size": B, "lr": lr})
        return {"settings": rows, "runs": runs, "checks": checks(cfg, rows, runs)}

    def headline(self, s):
        return "peak lambda_1 " + ", ".join(f"{name} {r['peak_lambda1']:.3g}" for name, r in s["runs"].items())


JOB = SharpestDirectionsJob()
run = JOB.run


def _grid(rows, runs, group, key):
    """[(setting value, run)] of one grid, sorted by the value (lr or B)."""
    return sorted(((r[key], runs[r["folder"]]) for r in rows if r["group"] == group), key=lambda t: t[0])


def _peak_check(claim, grid, label, decreasing):
    """The claim that the peak lambda_1 falls (or rises) along ``grid``."""
    peaks = [r["peak_lambda1"] for _, r in grid]
    return {"claim": claim, "values": {label(v): p for (v, _), p in zip(grid, peaks)},
            "holds": strictly_monotone(peaks, increasing=not decreasing), "caveat": _peak_caveat(r for _, r in grid)}


def checks(cfg, rows, runs):
    """The paper's qualitative claims, each with the numbers it rests on."""
    out = []
    by_lr, by_b = _grid(rows, runs, "lr", "lr"), _grid(rows, runs, "batch", "batch_size")
    if len(by_lr) >= 2:
        out.append(_peak_check(f"peak λ_1 falls as lr grows (B = {cfg.lr_grid_batch_size})", by_lr,
                               lambda lr: f"lr {lr:g}", decreasing=True))
    if len(by_b) >= 2:
        out.append(_peak_check(f"peak λ_1 rises with B (lr = {cfg.batch_grid_lr:g})", by_b, lambda b: f"B {b}",
                               decreasing=False))
    if by_lr:
        lr, r = by_lr[-1]
        e1 = early_e1_changes(r)
        if e1 is not None:
            at_one = e1.get(1.0)
            short = {g: v for g, v in e1.items() if g <= 0.5}
            out.append({"claim": f"early in training the γ = 1 step along e_1 does not decrease the loss, γ ≤ 0.5 does "
                                 f"(lr {lr:g}, B {cfg.lr_grid_batch_size}; mean ΔL over the early analyses)",
                        "values": {f"γ {g:g}": v for g, v in e1.items()},
                        "holds": at_one is not None and at_one >= 0 and all(v < 0 for v in short.values()),
                        "caveat": None})
    return out


def _peak_caveat(runs):
    late = [folder_name(r["batch_size"], r["lr"]) for r in runs if r["peak_at_end"]]
    return (f"λ_1 still rising at the last measurement in {', '.join(late)}: its peak is a lower bound"
            if late else None)
