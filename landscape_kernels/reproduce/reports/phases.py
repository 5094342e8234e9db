"""``report.md`` and figures of ``reproduce phases`` (Feng & Tu 2021)."""
import numpy as np

from .common import checks_table, fmt, save_figure, write_report

SHADES = ("#e8f0fe", "#e6f4ea", "#fef7e0", "#fce8e6")
PHASE_NAMES = ("I (down)", "II (flat)", "III (up)", "IV (plateau)")


def _epochs(r):
    return [rec["epoch"] + 1 for rec in r["records"]]


def _shade(ax, r):
    ep = _epochs(r)
    starts = r["phases"]["starts"] + [len(ep) - 1]
    for i in range(len(starts) - 1):
        ax.axvspan(ep[starts[i]], ep[starts[i + 1]], color=SHADES[i], lw=0)


def _error_figure(plt, out, s, written):
    runs = list(s["runs"].values())
    fig, axes = plt.subplots(1, len(runs), figsize=(3.8 * len(runs), 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        _shade(ax, r)
        ep = _epochs(r)
        ax.plot(ep, [rec["test_error"] for rec in r["records"]], "k-", lw=1, label="test error")
        if "train_error_wrong" in r["records"][0]:
            ax.plot(ep, [rec["train_error_wrong"] for rec in r["records"]], "C3-", lw=0.8,
                    label="train error, mislabeled (vs their labels)")
        if "cleaning" in r:
            ax.plot(ep[: len(r["cleaning"]["test_error"])], r["cleaning"]["test_error"], "C2--", lw=1,
                    label=f"cleaned at epoch {r['cleaning']['epoch']}")
        ax.set(xlabel="epoch", ylabel="error", title=f"ρ = {r['rho']:g}", yscale="log")
        ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_test_error.png", written)


def _order_figure(plt, out, s, written):
    keys = [("ensemble_alignment", "minibatch alignment (mean cosine)"), ("ensemble_amplitude", "⟨‖g^μ‖⟩"),
            ("cos_cw", "cos(g_c, g_w)"), ("strength_wc", "n_w‖g_w‖ / n_c‖g_c‖"), ("auc", "loss separation (AUC)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys), 3.3))
    for ax, (key, label) in zip(axes, keys):
        for i, r in enumerate(s["runs"].values()):
            pts = [(rec["epoch"] + 1, rec[key]) for rec in r["records"] if key in rec]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", lw=0.9, label=f"ρ = {r['rho']:g}")
        ax.set(xlabel="epoch", title=label)
        if key == "ensemble_amplitude":
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_order_parameters.png", written)


def _histogram_figure(plt, out, s, arrays, written):
    noisy = [n for n, r in s["runs"].items() if r["rho"] > 0 and n in arrays]
    if not noisy:
        return
    name = max(noisy, key=lambda n: s["runs"][n]["rho"])
    r, a = s["runs"][name], arrays[name]
    picks = [(f"start of {PHASE_NAMES[i]}", j) for i, j in enumerate(r["phases"]["starts"])]
    picks.append((f"cleaning time (epoch {r['clean_at']['epoch']})", r["clean_at"]["record"]))
    fig, axes = plt.subplots(1, len(picks), figsize=(3.3 * len(picks), 3.0), squeeze=False)
    wrong = a["wrong"].astype(bool)
    for ax, (label, j) in zip(axes[0], picks):
        logl = np.log10(np.maximum(a["losses"][j], 1e-8))
        bins = np.linspace(logl.min(), logl.max(), 40)
        ax.hist(logl[~wrong], bins=bins, alpha=0.6, density=True, label="correct")
        ax.hist(logl[wrong], bins=bins, alpha=0.6, density=True, label="mislabeled")
        ax.set(xlabel="log10 per-sample loss", title=f"ρ = {r['rho']:g}, {label}")
        ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_loss_histograms.png", written)


def write_phases_report(out, s, arrays=None):
    cfg, arrays = s["config"], arrays or {}
    lines = ["# Phases of learning with mislabeled data, and cleaning by per-sample loss (Feng & Tu 2021)", "",
             f"{cfg['dataset']}, {cfg['per_class']} training samples per class, a fraction ρ of their labels replaced "
             f"by another class; the first {cfg['test_size']} test samples; MLP in-{cfg['hidden']}-{cfg['hidden']}-10 "
             f"ReLU with biases, plain SGD B = {cfg['batch_size']}, lr {cfg['lr']:g}, {cfg['epochs']} epochs, measured "
             f"every {cfg['record_every']} epochs at fixed weights: minibatch-gradient alignment and amplitude over "
             f"{cfg['ensemble_batches']} disjoint minibatches, cos(g_c, g_w) and the groups' relative strength over "
             f"{cfg['group_samples']} training samples (block means of the per-sample Gram matrix), the loss separation "
             "AUC. Phases from the test-error curve (running median over 5 records; phase II starts when the descent "
             "is 90 % done; when the final error exceeds the best by more than a quarter of it and 0.005, phase III "
             "starts after the last record within 10 % of that rise and IV where 90 % of it is reached). The order parameters' definitions are our reading of the paper "
             "(no public code).", "", "## Paper's claims", ""] + checks_table(s["checks"]) + [
             "", "## Per ρ", "", "| ρ | phases start at epoch | final test error | best (epoch) | AUC peak (epoch, phase) | "
             "cleaned at | precision | recall | cleaned final | cleaned best |", "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in s["runs"].values():
        c, peak = r.get("cleaning"), r.get("auc_peak")
        lines.append(f"| {r['rho']:g} | {', '.join(map(str, r['phase_epochs']))} | {r['final_test_error']:.4f} | "
                     f"{r['best_test_error']:.4f} ({r['best_epoch']}) | "
                     + (f"{peak['auc']:.3f} ({peak['epoch']}, {PHASE_NAMES[peak['phase']]}) | " if peak else "— | ")
                     + (f"{c['epoch']} | {fmt(c['precision'])} | {fmt(c['recall'])} | {c['final_test_error']:.4f} | "
                        f"{c['best_test_error']:.4f} |" if c else "— | — | — | — | — |"))
    lines += ["", "## Order parameters per phase (median over the phase's records)", "",
              "| ρ | phase | alignment | amplitude | cos(g_c, g_w) | strength w/c | AUC |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in s["runs"].values():
        starts = r["phases"]["starts"] + [len(r["records"])]
        for i in range(len(starts) - 1):
            recs = r["records"][starts[i] : starts[i + 1]]
            cells = []
            for key in ("ensemble_alignment", "ensemble_amplitude", "cos_cw", "strength_wc", "auc"):
                vals = [rec[key] for rec in recs if key in rec]
                cells.append(fmt(float(np.median(vals))) if vals else "—")
            lines.append(f"| {r['rho']:g} | {PHASE_NAMES[i]} | " + " | ".join(cells) + " |")

    def draw(plt, out_, s_, written):
        _error_figure(plt, out_, s_, written)
        _order_figure(plt, out_, s_, written)
        _histogram_figure(plt, out_, s_, arrays, written)

    return write_report(out, lines, s, draw)
