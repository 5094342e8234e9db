"""``report.md`` and figures of ``reproduce duality`` (Feng, Zhang & Tu 2023)."""
import numpy as np

from .common import checks_table, fmt, save_figure, write_report

LABELS = {"batch_size": "batch size B", "lr": "learning rate α", "init_scale": "initialisation scale",
          "dropout": "dropout", "weight_penalty": "weight penalty β", "label_noise": "label noise ρ",
          "per_class": "training samples per class"}


def _pm(stat):
    return fmt(stat["mean"]) + (f" ± {fmt(stat['std'])}" if stat["std"] else "")


def _gap_figure(plt, out, s, arrays, written):
    sweeps = list(s["members"])
    cols = min(4, len(sweeps))
    rows = -(-len(sweeps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps):
        pts = [(v, s["runs"][n]["decomposition"]) for v, n in s["members"][sweep]]
        values = sorted({v for v, _ in pts})
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
        for v, col in zip(values, colours):
            d = [p for u, p in pts if u == v]
            ax.plot([p["real_gap"] for p in d], [p["estimate"] for p in d], "o", color=col, ms=4, label=f"{v:g}")
        lo = min(min(p["real_gap"], p["estimate"]) for _, p in pts)
        hi = max(max(p["real_gap"], p["estimate"]) for _, p in pts)
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.set(xlabel="test − train loss", ylabel="Σ_n (μ_g μ_w + c σ_g σ_w)", title=LABELS[sweep])
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    save_figure(plt, fig, out, "fig_gap_vs_estimate.png", written)


def _spectra_figure(plt, out, s, arrays, written):
    runs = arrays.get("runs", {})
    base = [r["decomposition"] for n, r in runs.items() if n.startswith("base_seed") and "sigma_g" in r["decomposition"]]
    if not base:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for d in base:
        n = np.arange(1, len(d["sigma_g"]) + 1)
        axes[0].semilogy(n, np.maximum(d["eigenvalues"], 1e-12), lw=0.8)
        axes[1].semilogy(n, d["sigma_g"], lw=0.8, color="C0")
        axes[1].semilogy(n, d["sigma_w"], lw=0.8, color="C1")
        terms = np.asarray(d["terms"])
        axes[2].plot(n / n[-1], np.cumsum(terms) / terms.sum(), lw=0.8)
    axes[0].set(xlabel="direction n (by λ)", ylabel="λ_n", title="layer-Hessian spectrum (baseline)")
    axes[1].set(xlabel="direction n (by λ)", ylabel="σ", title="σ_g (blue) and σ_w (orange)")
    axes[2].set(xlabel="fraction of directions (by λ)", ylabel="cumulative share of the estimate",
                title="where the gap estimate sits")
    axes[2].axvline(0.1, color="k", ls=":", lw=0.8)
    save_figure(plt, fig, out, "fig_spectra.png", written)


def _factor_figure(plt, out, s, arrays, written):
    sweeps = list(s["by_sweep"])
    fig, axes = plt.subplots(1, len(sweeps), figsize=(3.0 * len(sweeps), 3.2), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        rows = s["by_sweep"][sweep]
        x = [r["value"] for r in rows]
        for key, label in (("sigma_g_total", "σ_g (sharpness)"), ("sigma_w_total", "σ_w (spread)"),
                           ("real_gap", "gap")):
            y = np.array([r[key]["mean"] for r in rows])
            ax.plot(x, y / y[0] if y[0] else y, "o-", ms=3, label=label)
        if min(x) > 0 and max(x) >= 10 * min(x):
            ax.set_xscale("log")
        ax.set(xlabel=LABELS[sweep], title="relative to the first point")
        ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_factors.png", written)


def _norm_figure(plt, out, s, arrays, written):
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for i, (sweep, members) in enumerate(s["members"].items()):
        d = [s["runs"][n]["decomposition"] for _, n in members]
        ax.plot([r["weight_norm"] for r in d], [r["sigma_w_total"] for r in d], "o", ms=3.5, color=f"C{i}",
                label=LABELS[sweep], alpha=0.7)
    ax.set(xlabel="‖W‖_F of the analysed layer", ylabel="σ_w = (Σ_n σ_w,n²)^½", title="dual-weight spread against the weight norm")
    ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_sigma_w_vs_norm.png", written)


def write_duality_report(out, s, arrays=None):
    cfg = s["config"]
    arrays = arrays or {}
    lines = ["# The activity–weight duality and the generalisation gap (Feng, Zhang & Tu 2023)", "",
             f"{cfg['dataset']}, {cfg['per_class']} correctly labelled training samples per class, the first "
             f"{cfg['test_size']} test samples, network in-{cfg['hidden']}-{cfg['hidden']}-10 ReLU without biases; "
             f"baseline SGD B = {cfg['batch_size']}, α = {cfg['lr']:g}, trained until the correct samples' loss is below "
             f"{cfg['stop_loss']:g} with accuracy > 0.99 over 9 epochs (at most {cfg['max_epochs']} epochs). Each test "
             "sample is paired with its nearest training sample of the same class (pixels); the dual weight change "
             "ΔW_k = (W Δa_k) a_kᵀ/‖a_k‖² of the 30 × 30 matrix turns the training sample into the test sample for "
             "the layers above; projected on the eigenvectors of the exact layer Hessian, the gap estimate is "
             "Σ_n (μ_g,n μ_w,n + c_n σ_g,n σ_w,n). Over the complete eigenbasis it equals the mean over pairs of "
             "l(test) − l(nearest train) exactly (the identity residual below), so it differs from the real gap only "
             "by the paired training samples' loss against the whole training loss.", "",
             "## Paper's claims", ""] + checks_table(s["checks"]) + [
             "", "Criteria fixed before the runs; which factor each setting acts through is our reading of the paper "
             "(docs/reproductions/duality.md).", ""]
    for sweep, rows in s["by_sweep"].items():
        lines += [f"## {LABELS[sweep]}", "", "| value | seeds | real gap | estimate | σ_g total | σ_w total | ‖W‖ | "
                  "top 10 % share | test acc. |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['value']:g} | {r['seeds']} | {_pm(r['real_gap'])} | {_pm(r['estimate'])} | "
                         f"{_pm(r['sigma_g_total'])} | {_pm(r['sigma_w_total'])} | {_pm(r['weight_norm'])} | "
                         f"{r['top_share']:.2f} | {r['test_accuracy']:.4f} |")
        lines.append("")
    lines += ["## Per run", "", "| run | epochs | stopped by | correct loss | gap | estimate | identity residual | "
              "duality error | training s | decomposition s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["runs"].items():
        d, sec = r["decomposition"], r["seconds"]
        lines.append(f"| {name} | {r['epochs']} | {r['stopped_by']} | {fmt(r['correct_loss'])} | {fmt(d['real_gap'])} | "
                     f"{fmt(d['estimate'])} | {d['identity_residual']:.1e} | {d['duality_error']:.1e} | "
                     f"{sec['training']:.0f} | {sec['decomposition']:.1f} |")

    def draw(plt, out_, s_, written):
        _gap_figure(plt, out_, s_, arrays, written)
        _spectra_figure(plt, out_, s_, arrays, written)
        _factor_figure(plt, out_, s_, arrays, written)
        _norm_figure(plt, out_, s_, arrays, written)

    return write_report(out, lines, s, draw)
