"""``report.md`` and figures of ``reproduce variance-flatness`` (Feng & Tu 2021) and of its (B, lr) grid."""
import math
import os

import numpy as np

from .common import draw_figures, figure_lines, fmt, save_figure, write_report


def _spectrum_figures(plt, out, s, arrays, written):
    var = np.array(s["pca"]["variances"])
    i = np.arange(1, len(var) + 1)
    fit = s["pca"]["gamma_fit"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    pos = var > 0
    ax[0].loglog(i[pos], var[pos], ".", ms=3, label="σ_i²")
    xs = np.array([fit["x_min"], fit["x_max"]])
    ax[0].loglog(xs, np.exp(fit["log_prefactor"]) * xs ** fit["exponent"], "r-",
                 label=f"fit i ≥ {int(fit['x_min'])}: γ = {-fit['exponent']:.2f}")
    ax[0].set(xlabel="rank i", ylabel="variance σ_i²", title=f"PCA spectrum of {_matrix(s['config'])} (Fig. 1)")
    ax[0].legend()
    rest = var[1:]
    share = np.cumsum(rest) / rest.sum()
    ax[1].semilogx(np.arange(2, len(var) + 1), share)
    ax[1].axhline(0.9, color="gray", ls=":")
    ax[1].axvline(s["pca"]["n90"], color="r", ls="--", label=f"n90 = {s['pca']['n90']}")
    ax[1].set(xlabel="n", ylabel="Σ_{i=2..n} σ_i² / Σ_{i≥2} σ_i²", title="cumulative variance without PC1")
    ax[1].legend()
    save_figure(plt, fig, out, "fig1_spectrum.png", written)
    theta = np.asarray(arrays["theta"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(theta[:, 0], theta[:, 1], lw=0.5)
    ax[0].set(xlabel="θ1", ylabel="θ2", title="drift along PC1, diffusion along PC2")
    ax[1].plot(theta[:, 2], theta[:, 3], lw=0.5)
    ax[1].set(xlabel="θ_10", ylabel="θ_20", title="diffusion along low-variance PCs")
    save_figure(plt, fig, out, "fig1_trajectories.png", written)


def _flatness_figures(plt, out, s, written):
    pcs = np.array(s["pcs"])
    F = np.array(s["flatness"]["widths"])
    var = np.array(s["pca"]["variances"])[pcs - 1]
    prof = s["profiles"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    L = np.array(prof["losses"])
    for p, row in zip(prof["pcs"], L):
        ax[0].plot(prof["deltas"], np.log(row), label=f"PC{p}")
    ax[0].axhline(math.log(s["flatness"]["loss0"]) + s["flatness"]["threshold"], color="gray", ls=":", label="ln L0 + 1")
    ax[0].set(xlabel="δθ", ylabel="ln L", title="loss profiles (Fig. 2)")
    ax[0].legend(fontsize=7)
    sat = np.array(s["flatness"]["saturated_left"]) | np.array(s["flatness"]["saturated_right"])
    ax[1].semilogy(pcs[~sat], F[~sat], ".", label="F_i")
    if sat.any():
        ax[1].semilogy(pcs[sat], F[sat], "x", label="saturated")
    ax[1].set(xlabel="PC i", ylabel="flatness F_i", title="flatness grows with i")
    ax[1].legend()
    fit = s["psi"]["fit"]
    ax[2].loglog(F[~sat], var[~sat], ".")
    xs = np.array([fit["x_min"], fit["x_max"]])
    ax[2].loglog(xs, np.exp(fit["log_prefactor"]) * xs ** fit["exponent"], "r-",
                 label=f"ψ = {s['psi']['psi']:.2f}, 95 % CI [{-fit['ci95'][1]:.2f}, {-fit['ci95'][0]:.2f}]")
    ax[2].set(xlabel="F_i", ylabel="σ_i²", title="inverse variance-flatness relation")
    ax[2].legend()
    save_figure(plt, fig, out, "fig2_flatness.png", written)


def _mlf_figures(plt, out, s, written):
    F = np.array(s["flatness"]["widths"])
    d = s["mlf"]["derivatives"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for a, key, label in zip(ax, ("sigma_tilde2", "M0", "noise_strength"),
                             ("σ̃_i² = Var_μ θ*", "M_ii^(0)", "(M_ii^(0))² σ̃_i²")):
        v = np.array(d[key], dtype=float)
        ok = np.isfinite(v) & (v > 0)
        a.loglog(F[ok], v[ok], ".", label="derivatives")
        par = s["mlf"]["parabola"]
        idx = [s["pcs"].index(p) for p in par["pcs"]]
        pv = np.array(par[key], dtype=float)
        pok = np.isfinite(pv) & (pv > 0)
        a.loglog(F[idx][pok], pv[pok], "rx", label="parabola")
        a.set(xlabel="F_i", ylabel=label)
        a.legend(fontsize=7)
    ax[0].set_title("MLF ensemble (Fig. 3)")
    save_figure(plt, fig, out, "fig3_mlf.png", written)


def _temperature_figures(plt, out, s, arrays, written):
    t = s["temperature"]
    F = np.array(s["flatness"]["widths"])
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for p, row in zip(t["profile_pcs"], t["profiles"]):
        ax[0].plot(np.array(t["offsets_per_width"]), row, label=f"PC{p}")
    ax[0].set(xlabel="δθ / F_i", ylabel="T_i(δθ)", title="active temperature (Fig. 5)")
    ax[0].legend(fontsize=7)
    T0 = np.array(t["T0"])
    ok = T0 > 0
    ax[1].loglog(F[ok], T0[ok], ".")
    ax[1].set(xlabel="F_i", ylabel="T_i(0)", title="T_i(0) falls with flatness")
    Tt = np.array(t["along_training"])
    loss = np.asarray(arrays["loss_t"])
    if len(Tt):
        epochs = np.arange(1, len(Tt) + 1)
        ax[2].loglog(epochs, Tt.mean(1), label="T(t) (mean over profile PCs)")
        ax2 = ax[2].twinx()
        ax2.loglog(epochs, loss, "r", label="L(t)")
        ax2.set_ylabel("full training loss L", color="r")
        ax[2].set(xlabel="epoch", ylabel="T(t)", title=f"corr(log T, log L) = {t['corr_log_T_log_L']:.2f}")
    save_figure(plt, fig, out, "fig5_temperature.png", written)


def _matrix(cfg):
    """W1, W2, ... : the analysed weight matrix (W2, the paper's, in runs from before --layer)."""
    return f"W{cfg.get('layer', 2)}"


def _network(cfg):
    hidden = cfg.get("hidden", (50, 50))
    text = f"hidden widths {'-'.join(map(str, hidden))}"
    if cfg.get("optimizer") == "momentum":
        text += f", momentum {cfg['momentum']:g}"
    elif cfg.get("optimizer") == "adam":
        text += f", Adam betas {', '.join(f'{b:g}' for b in cfg['betas'])}"
    if cfg.get("train_samples"):
        text += f", {cfg['train_samples']} training samples"
    return text


def write_variance_flatness_report(out, s, arrays):
    """PNG figures and report.md of a ``reproduce variance-flatness`` summary."""
    def draw(plt, out, s, written):
        _spectrum_figures(plt, out, s, arrays, written)
        _flatness_figures(plt, out, s, written)
        _mlf_figures(plt, out, s, written)
        _temperature_figures(plt, out, s, arrays, written)

    cfg, tr = s["config"], s["training"]
    optimizer = cfg.get("optimizer", "sgd")
    lines = [f"# Inverse variance-flatness relation: {s['dataset']}, {optimizer}, B = {cfg['batch_size']}, "
             f"α = {cfg['lr']}", "",
             f"landscape_kernels {s['library_version']}; {_network(cfg)}; {tr['epochs']} epochs ({tr['steps']} "
             f"steps, stopped by {tr['stopped_by']}); test accuracy {fmt(tr['test_accuracy'])}; PCA window of "
             f"{s['pca']['num_snapshots']} snapshots of {_matrix(cfg)}; {len(s['pcs'])} PCs analysed (every "
             f"{cfg['pcs_every']}th); flatness from the {cfg['center']} weights.", ""]
    if tr.get("instability"):
        u = tr["instability"]
        lines += [f"SGD turned unstable: in epochs {u[0]['epoch']}–{u[-1]['epoch']} the full training accuracy "
                  f"({', '.join(fmt(r['full_accuracy']) for r in u)}) stayed more than {cfg['instability_drop']:g} "
                  f"below its best; the run was rolled back to the end of epoch {u[0]['epoch'] - 1} and that window "
                  "is analysed (the paper's stopping rule was not met: at this lr / B the loss does not reach 5e-5 "
                  "before the noise erodes the solution).", ""]
    lines += ["## Checkable numbers (Feng & Tu 2021)", "",
              "| quantity | this run | paper | tolerance | within |", "|---|---:|---|---|---|"]
    for r in s["checks"]:
        lo, hi = r["tolerance"]
        scope = "tolerance of the paper's system" if s["dataset"] == "mnist" else "MNIST value"
        mark = ("yes" if r["within"] else "**no**") if r["applies"] else f"({'yes' if r['within'] else 'no'}; {scope})"
        lines.append(f"| {r['quantity']} | {fmt(r['value'])} | {r['paper']} | [{fmt(lo)}, {fmt(hi)}] | {mark} |")
    g, p = s["pca"]["gamma_fit"], s["psi"]["fit"]
    by_end = s["pca"].get("gamma_by_upper_end", {})
    if by_end:
        lines += ["", "γ by the upper end of the fit (the paper fixes only i ≥ 20): " +
                  ", ".join(f"20..{k}: {v:.2f}" for k, v in by_end.items()) + f" (PCs with variance: {s['pca']['rank']})."]
    lines += ["", f"γ = {s['pca']['gamma']:.3f} ± {g['stderr']:.3f} (fit over PCs {int(g['x_min'])}..{int(g['x_max'])}); "
              f"ψ = {s['psi']['psi']:.3f}, 95 % CI [{-p['ci95'][1]:.3f}, {-p['ci95'][0]:.3f}] over {p['n']} PCs "
              "(PC1 and saturated sides excluded)."]
    timings = ["## Timings (s)", "", "| stage | seconds |", "|---|---:|"]
    timings += [f"| {k} | {v:.1f} |" for k, v in s["timings_s"].items()] + [""]
    return write_report(out, lines, s, draw, footer=timings)


def _grid_figure(plt, out, grid, written):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = "os^Dv<>ph*"
    for i, r in enumerate(r for r in grid["settings"] if "psi" in r):
        F, var = np.array(r["widths"]), np.array(r["variances"])
        keep = ~np.array(r["saturated"]) & (np.array(r["pcs"]) != 1) & (var > 0)
        ax.loglog(F[keep], var[keep], markers[i % len(markers)], ms=3, alpha=0.7,
                  label=f"B = {r['batch_size']}, α = {r['lr']:g}: ψ = {r['psi']:.2f}")
    ax.set(xlabel="flatness F_i", ylabel="variance σ_i²", title="σ² vs F across (B, α)")
    ax.legend(fontsize=7)
    save_figure(plt, fig, out, "fig_grid.png", written)


def write_grid_report(out, grid):
    """``fig_grid.png`` (sigma_i^2 against F_i for every setting, log-log) and ``grid.md``."""
    plt, written = draw_figures(_grid_figure, out, grid)
    lines = [f"# Inverse variance-flatness relation across (B, α): {grid['dataset']}", "",
             f"ψ > 0 for every setting: **{'yes' if grid['all_psi_positive'] else 'no'}**", "",
             "| B | α | ψ | 95 % CI | γ | n90 | epochs | stopped by | test accuracy | report |",
             "|---:|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for r in grid["settings"]:
        if "psi" not in r:
            lines.append(f"| {r['batch_size']} | {r['lr']:g} | failed: {r['error']} | | | | | | | {r['folder']} |")
            continue
        lines.append(f"| {r['batch_size']} | {r['lr']:g} | {r['psi']:.3f} | [{r['psi_ci95'][0]:.2f}, {r['psi_ci95'][1]:.2f}] | "
                     f"{r['gamma']:.2f} | {r['n90']} | {r['epochs']} | {r.get('stopped_by', '')} | "
                     f"{fmt(r['test_accuracy'])} | [{r['folder']}]({r['folder']}/report.md) |")
    lines += [""] + figure_lines(written, plt)
    with open(os.path.join(out, "grid.md"), "w") as f:
        f.write("\n".join(lines))
