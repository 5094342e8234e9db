"""``landscape-kernels reproduce sharpest-directions``: Jastrzebski et al. 2019 (SPEC §2.1-2.3).

Plain SGD (no momentum, constant lr) over the lr grid at one batch size and the batch-size grid at one
lr, with the top-K Hessian eigenvalues of the training loss tracked on a fixed subset every
``measure_examples`` training examples; the decomposed step and the cross-sections (SPEC §2.2) at the
first ``step_analyses`` measurements. The report checks the paper's claims: the peak of lambda_1 falls
with lr and rises with B, and early in training the gamma = 1 step along e_1 does not decrease the loss
while gamma <= 0.5 does.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, replace

from ..version import __version__
from .tracked import load_data, train_tracked


@dataclass
class SharpestDirectionsConfig:
    dataset: str = "mnist"
    data_dir: str = None
    model: str = "mlp"
    lrs: tuple = (0.1, 0.01, 0.001)  # the lr grid, at B = lr_grid_batch_size
    lr_grid_batch_size: int = 128
    batch_sizes: tuple = (8, 128, 1024)  # the B grid, at lr = batch_grid_lr
    batch_grid_lr: float = 0.05
    epochs: int = 30
    train_samples: int = None  # None: the whole training set
    subset: int = 2560  # the fixed Hessian subset (SPEC §2.1)
    k: int = 5
    measure_examples: int = 3000  # during the first dense_epochs, a measurement every this many training examples
    dense_epochs: int = 1  # (SPEC: every 128-2048 examples early); then one at the start of every epoch
    step_analyses: int = 4  # decomposed step and cross-sections at the first this many measurements
    tol: float = 1e-3
    seed: int = 0
    quick: bool = False

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


def run(cfg, out, resume=False, progress=False, log=print):
    cfg = cfg.resolved()
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    train, test, subset = load_data(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.subset, cfg.seed)
    log(f"{cfg.dataset}: {train[0].shape[0]} training samples, Hessian subset {subset[0].shape[0]}, model {cfg.model}")
    runs = {}
    rows = []
    for group, B, lr in settings(cfg):
        name = folder_name(B, lr)
        if name not in runs:
            every = max(1, round(cfg.measure_examples / B))
            log(f"--- B = {B}, lr = {lr}: {cfg.epochs} epochs, top-{cfg.k} eigenpairs every {every} steps for "
                f"{cfg.dense_epochs} epoch(s), then every epoch")
            t = time.perf_counter()
            runs[name] = train_tracked(os.path.join(out, name), train, test, subset, model_name=cfg.model,
                                       batch_size=B, lr=lr, epochs=cfg.epochs, k=cfg.k, every=every, seed=cfg.seed,
                                       tol=cfg.tol, dense_epochs=cfg.dense_epochs, step_analyses=cfg.step_analyses, resume=resume,
                                       progress=progress, log=log)
            r = runs[name]
            log(f"    peak lambda_1 {r['peak_lambda1']:.4g} at epoch {r['peak_epoch']:.2f} (lr lambda_1 "
                f"{r['peak_lr_lambda1']:.3g}), final {r['final_lambda1']:.4g}, test accuracy {r['test_accuracy']:.4f} "
                f"({time.perf_counter() - t:.0f} s)")
        rows.append({"group": group, "folder": name, "batch_size": B, "lr": lr})
    summary = {"library_version": __version__, "config": asdict(cfg), "settings": rows, "runs": runs,
               "checks": checks(cfg, rows, runs), "seconds": time.perf_counter() - t0}
    from .reports.sharpness import write_sharpest_directions_report

    write_sharpest_directions_report(out, summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def early_e1_changes(run):
    """Mean loss change of the partial step along e_1 per gamma, averaged over the early analyses
    (every measurement that has one except the one at initialisation)."""
    analysed = [m["decomposed"] for m in run["measurements"] if "decomposed" in m and m["step"] > 0]
    if not analysed:
        return None
    gammas = analysed[0]["gammas"]
    means = [sum(a["mean_changes"][0][j] for a in analysed) / len(analysed) for j in range(len(gammas))]
    return dict(zip(gammas, means))


def _monotone(values, decreasing):
    pairs = list(zip(values[:-1], values[1:]))
    return all((a > b) if decreasing else (a < b) for a, b in pairs)


def checks(cfg, rows, runs):
    """The paper's qualitative claims (SPEC §2.2-2.3), each with the numbers it rests on."""
    out = []
    by_lr = sorted(((r["lr"], runs[r["folder"]]) for r in rows if r["group"] == "lr"), key=lambda t: t[0])
    if len(by_lr) >= 2:
        peaks = [r["peak_lambda1"] for _, r in by_lr]
        out.append({"claim": f"peak λ_1 falls as lr grows (B = {cfg.lr_grid_batch_size})",
                    "values": {f"lr {lr:g}": p for (lr, _), p in zip(by_lr, peaks)},
                    "holds": _monotone(peaks, decreasing=True),
                    "caveat": _peak_caveat(r for _, r in by_lr)})
    by_b = sorted(((r["batch_size"], runs[r["folder"]]) for r in rows if r["group"] == "batch"), key=lambda t: t[0])
    if len(by_b) >= 2:
        peaks = [r["peak_lambda1"] for _, r in by_b]
        out.append({"claim": f"peak λ_1 rises with B (lr = {cfg.batch_grid_lr:g})",
                    "values": {f"B {b}": p for (b, _), p in zip(by_b, peaks)},
                    "holds": _monotone(peaks, decreasing=False),
                    "caveat": _peak_caveat(r for _, r in by_b)})
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
