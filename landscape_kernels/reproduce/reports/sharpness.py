"""``report.md`` and figures of ``reproduce sharpest-directions`` and ``reproduce nsgd`` (Jastrzębski et al. 2019)."""

import numpy as np

from ...analyses.sharpest import early_e1_changes
from .common import checks_table, fmt, save_figure, write_report


def _curve(run, key):
    ms = run["measurements"]
    x = np.array([m["epoch_float"] for m in ms])
    if key == "lambda1":
        y = np.array([m["eigenvalues"][0] for m in ms])
    elif key == "lr_lambda1":
        y = run["lr"] * np.array([m["eigenvalues"][0] for m in ms])
    else:
        y = np.array([m.get(key, np.nan) if m.get(key) is not None else np.nan for m in ms], dtype=float)
    return x, y


def _sharpest_figures(plt, out, s, written):
    runs = s["runs"]
    groups = {"lr": [r for r in s["settings"] if r["group"] == "lr"],
              "batch": [r for r in s["settings"] if r["group"] == "batch"]}
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    for col, (group, rows) in enumerate(groups.items()):
        for r in rows:
            run = runs[r["folder"]]
            label = f"lr {r['lr']:g}" if group == "lr" else f"B {r['batch_size']}"
            ax[0][col].plot(*_curve(run, "lambda1"), label=label)
            ax[1][col].plot(*_curve(run, "lr_lambda1"), label=label)
        title = (f"lr grid, B = {s['config']['lr_grid_batch_size']}" if group == "lr"
                 else f"B grid, lr = {s['config']['batch_grid_lr']:g}")
        ax[0][col].set(xlabel="epoch", ylabel="λ_1", title=title)
        ax[1][col].axhline(2.0, color="gray", ls=":", label="lr λ_1 = 2")
        ax[1][col].set(xlabel="epoch", ylabel="lr · λ_1")
        ax[0][col].legend(fontsize=8)
        ax[1][col].legend(fontsize=8)
    save_figure(plt, fig, out, "fig_lambda1.png", written)
    top = _largest_lr_run(s)
    analysed = [m for m in top["measurements"] if "decomposed" in m and m["step"] > 0]
    if not analysed:
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    d = analysed[0]["decomposed"]
    gammas = d["gammas"]
    mean = np.mean([np.array(m["decomposed"]["mean_changes"]) for m in analysed], axis=0)
    for label, row in zip(d["labels"], mean):  # the full step changes the loss far more: its own panel
        ax[1 if label == "full step" else 0].plot(gammas, row, "o-", ms=3, label=label)
    for a, what in zip(ax[:2], ("partial steps along one direction", "the full step")):
        a.axhline(0, color="gray", lw=0.5)
        a.set(xlabel="γ", ylabel="ΔL", title=f"{what} (lr {top['lr']:g}, B {top['batch_size']}, early mean)")
        a.legend(fontsize=7)
    cs = analysed[-1]["cross_sections"]
    for i, row in enumerate(cs["losses"]):
        ax[2].plot(cs["epsilons"], row, ".-", label=f"e_{i + 1}")
    ax[2].set(xlabel="ε (units of the SGD step along e_i)", ylabel="loss", yscale="log",
              title=f"cross-sections at epoch {analysed[-1]['epoch_float']:.2f}")
    ax[2].legend(fontsize=7)
    save_figure(plt, fig, out, "fig_decomposed_step.png", written)


def _largest_lr_run(s):
    rows = [r for r in s["settings"] if r["group"] == "lr"] or s["settings"]
    return s["runs"][max(rows, key=lambda r: r["lr"])["folder"]]


def _data_and_model(s):
    """The opening of both reports' set-up paragraph: data, training samples, model."""
    cfg, first = s["config"], next(iter(s["runs"].values()))
    return f"{cfg['dataset']}, {first['train_samples']} training samples, model `{cfg['model']}`"


def write_sharpest_directions_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Sharpest directions along SGD training (Jastrzębski et al. 2019)", "",
             f"{_data_and_model(s)}, {cfg['epochs']} epochs "
             f"per setting, plain SGD (no momentum, constant lr). Top-{cfg['k']} Hessian eigenpairs of the training loss "
             f"on a fixed subset of {cfg['subset']} samples (batches of 128, eval mode) every {cfg['measure_examples']} "
             f"training examples in the first {cfg['dense_epochs']} epoch(s), then at the start of every epoch, and at "
             f"the end; warm-started Lanczos to residual ≤ {cfg['tol']:g} |λ_1|; ||H||_F from 50 Gaussian "
             "probes (the correct estimator). Decomposed step and cross-sections (Jastrzębski et al. 2019) at the first "
             f"{cfg['step_analyses']} measurements of each run.", "",
             "## Paper's claims", ""] + checks_table(s["checks"]) + ["",
             "## Per setting", "",
             "| B | lr | peak λ_1 | at epoch | lr·λ_1 at peak | final λ_1 | final ‖H‖_F | distance from init | "
             "test accuracy | tracking s | training s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["runs"].values():
        last = r["measurements"][-1]
        lines.append(f"| {r['batch_size']} | {r['lr']:g} | {fmt(r['peak_lambda1'])}{' (rising)' if r['peak_at_end'] else ''} "
                     f"| {r['peak_epoch']:.2f} | {fmt(r['peak_lr_lambda1'])} | {fmt(r['final_lambda1'])} | "
                     f"{fmt(r['final_frobenius'])} | {fmt(last['distance_from_init'])} | {r['test_accuracy']:.4f} | "
                     f"{r['tracking_seconds']:.0f} | {r['training_seconds']:.0f} |")
    lines += ["", "## Decomposed step along e_1 early in training (mean ΔL over the analyses after initialisation)", ""]
    header = None
    for r in s["runs"].values():
        e1 = early_e1_changes(r)
        if e1 is None:
            continue
        if header is None:
            header = list(e1)
            lines += ["| B | lr | " + " | ".join(f"γ = {g:g}" for g in header) + " |",
                      "|---:|---:|" + "---:|" * len(header)]
        lines.append(f"| {r['batch_size']} | {r['lr']:g} | " + " | ".join(fmt(e1[g]) for g in header) + " |")
    lines += ["", "Alignment at the last measurement: cos(g_B, g) mean, and the share of the SGD step inside the "
              "top-K subspace:", "", "| B | lr | cos(g_B, g) | step share in top-K |", "|---:|---:|---:|---:|"]
    for r in s["runs"].values():
        m = r["measurements"][-1]
        lines.append(f"| {r['batch_size']} | {r['lr']:g} | {fmt(m.get('cos_minibatch_full'))} | "
                     f"{fmt(m.get('step_share_topk'))} |")
    return write_report(out, lines, s, _sharpest_figures)


def _nsgd_figures(plt, out, s, written):
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for r in s["runs"].values():
        label = f"γ {r['gamma']:g}" + (" (SGD)" if r["gamma"] == 1.0 else "")
        ep = [t["epoch"] + 1 for t in r["training"]]
        ax[0].semilogy(ep, [t["full_loss"] for t in r["training"]], label=label)
        ax[1].plot(*_curve(r, "lambda1"), "o-", ms=3, label=label)
        ax[2].plot(*_curve(r, "frobenius"), "o-", ms=3, label=label)
    ax[0].set(xlabel="epoch", ylabel="full training loss", title="training speed")
    ax[1].set(xlabel="epoch", ylabel="λ_1", title="sharpness")
    ax[2].set(xlabel="epoch", ylabel="‖H‖_F")
    for a in ax:
        a.legend(fontsize=8)
    save_figure(plt, fig, out, "fig_nsgd.png", written)


def write_nsgd_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Nudged SGD (Jastrzębski et al. 2019)", "",
             f"{_data_and_model(s)}, lr {cfg['lr']:g}, "
             f"B {cfg['batch_size']}, no momentum, {cfg['epochs']} epochs, K = {cfg['k']}: the step along the top-K "
             "Hessian eigenvectors (refreshed at the start of every epoch, Lanczos on a fixed subset of "
             f"{cfg['subset']} samples) scaled by γ (`correct_v`); γ = 1 is SGD. Same initialisation and minibatch "
             "order in every run.", "", "## Paper's claims", ""] + checks_table(s["checks"]) + [
             "", "## Per γ", "", "| γ | full loss, epoch 1 | final full loss | final train accuracy | final λ_1 | "
             "final ‖H‖_F | test accuracy |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["runs"].values():
        t = r["training"]
        lines.append(f"| {r['gamma']:g} | {fmt(t[0]['full_loss'])} | {fmt(t[-1]['full_loss'])} | "
                     f"{fmt(t[-1]['full_accuracy'])} | {fmt(r['final_lambda1'])} | {fmt(r['final_frobenius'])} | "
                     f"{r['test_accuracy']:.4f} |")
    return write_report(out, lines, s, _nsgd_figures)
