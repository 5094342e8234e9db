"""``report.md`` and figures of ``reproduce noise-curvature`` (Zhang, Yang & Tu 2026)."""

import numpy as np

from .common import checks_table, fmt, save_figure, write_report

LOSS_TITLES = {"ce": "cross-entropy", "mse": "MSE on softmax"}


def _relation_figure(plt, out, s, written):
    firsts = {}
    for r in s["runs"].values():
        firsts.setdefault(r["loss"], r)
    fig, axes = plt.subplots(1, len(firsts), figsize=(5.2 * len(firsts), 4.2), squeeze=False)
    for ax, (loss, r) in zip(axes[0], firsts.items()):
        rel = r["relation"]
        h, c = np.array(rel["H_ii"]), np.array(rel["C_ii"])
        keep = (h > 0) & (c > 0)
        g = rel["gamma"]
        ax.loglog(h[keep], c[keep], ".", ms=3, alpha=0.6, label="C_ii = v_iᵀ C v_i")
        xs = np.array([g["x_min"], g["x_max"]])
        ax.loglog(xs, np.exp(g["log_prefactor"]) * xs ** g["exponent"], "k-",
                  label=f"fit γ = {g['exponent']:.3f} (R² {g['r2']:.2f})")
        if "predicted" in rel:
            p = np.array(rel["predicted_ii"])
            ok = keep & (p > 0)
            scale = np.median(c[ok] / p[ok])  # C is proportional to E_p[h_p^2] up to a constant
            ax.loglog(h[ok], scale * p[ok], "x", ms=3, alpha=0.5,
                      label=f"∝ v_iᵀ E[h_p²] v_i (γ = {rel['predicted']['exponent']:.3f})")
        ax.set(xlabel="H_ii = λ_i", ylabel="C_ii", title=f"{LOSS_TITLES.get(loss, loss)}, seed {r['seed']}")
        ax.legend(fontsize=7)
    save_figure(plt, fig, out, "fig_c_vs_h.png", written)


def write_noise_curvature_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Noise covariance against curvature: the superlinear relation (Zhang, Yang & Tu 2026)", "",
             f"{cfg['dataset']}, {cfg['per_class']} samples per class, network in-{cfg['hidden']}-{cfg['hidden']}-10 "
             f"ReLU without bias, SGD B = {cfg['batch_size']}, lr {cfg['lr']:g} with a per-epoch cosine decay to "
             f"{cfg['lr'] * cfg['final_lr_fraction']:g} over {cfg['epochs']} epochs, gradient clipping {cfg['clip']:g}. "
             f"Matrix `{cfg['param']}`, the other layers fixed: exact layer Hessian H (Kronecker factors, dense), "
             f"minibatch covariance C over one shuffled pass at B = {cfg['batch_size']}, C_ii = v_iᵀ C v_i against "
             f"H_ii = λ_i over the top {cfg['top']} eigen-directions (non-positive pairs dropped), γ = OLS slope of "
             "log10 C_ii on log10 H_ii.", "", "## Paper's claims", ""] + checks_table(s["checks"]) + [
             "", "## Per loss (mean ± spread over seeds)", "",
             "| loss | seeds | γ | R² | γ of v_iᵀ E[h_p²] v_i | ‖CH − HC‖/‖CH‖ | random rotation |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def pm(stat):
        if stat is None:
            return "–"
        return fmt(stat["mean"]) + (f" ± {fmt(stat['std'])}" if stat["std"] else "")

    for loss, b in s["by_loss"].items():
        lines.append(f"| {LOSS_TITLES.get(loss, loss)} | {b['seeds']} | {pm(b['gamma'])} | {pm(b['r2'])} | "
                     f"{pm(b['predicted_gamma'])} | {pm(b['commutator'])} | {pm(b['random_commutator'])} |")
    lines += ["", "## Per run", "", "| run | γ [95 % CI] | directions used | final train loss | train acc. | test acc. | "
              "training s | Hessians s | covariance s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["runs"].items():
        g, sec = r["relation"]["gamma"], r["seconds"]
        lines.append(f"| {name} | {g['exponent']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] | "
                     f"{r['relation']['used']} / {r['relation']['top']} | {fmt(r['final_full_loss'])} | "
                     f"{fmt(r['final_train_accuracy'])} | {r['test_accuracy']:.4f} | {sec['training']:.0f} | "
                     f"{sec['hessians']:.1f} | {sec['covariance']:.1f} |")
    return write_report(out, lines, s, _relation_figure)
