"""``report.md`` and figures of ``reproduce escape-rate`` (Mori et al. 2022)."""
import numpy as np

from .common import checks_table, fmt, save_figure, write_report


def _escape_figures(plt, out, s, written):
    if "stationary" in s:
        rows = s["stationary"]["rows"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for lr in dict.fromkeys(r["lr"] for r in rows):
            rs = [r for r in rows if r["lr"] == lr]
            B = [r["batch_size"] for r in rs]
            line = ax.errorbar(B, [r["phi"] for r in rs], yerr=[r["phi_stderr"] for r in rs], fmt="o", label=f"SGD, η {lr:g}")
            ax.plot(B, [r["theory"] for r in rs], "--", color=line[0].get_color(), label=f"1 + B/(η h*), η {lr:g}")
        ax.set(xscale="log", yscale="log", xlabel="B", ylabel="φ", title="stationary P ∝ L^−φ (1-D regression)")
        ax.legend(fontsize=7)
        save_figure(plt, fig, out, "fig_stationary.png", written)
    if "passage" in s:
        fig, ax = plt.subplots(figsize=(5, 4))
        for r in s["passage"]["rows"]:
            c, t = np.array(r["thresholds"]), np.array(r["mean_times"])
            line = ax.loglog(c, t, "o", label=f"d = {r['dim']}: SGD, slope {r['slope']:.2f}")
            ax.loglog(c, t[0] * (c / c[0]) ** r["slope"], "-", color=line[0].get_color(), lw=0.8)
            ax.loglog(c, r["sde_times"], "--", color=line[0].get_color(), lw=0.8,
                      label=f"d = {r['dim']}: SDE, slope {r['sde_slope']:.2f} (c → ∞: {r['theory']:.2f})")
        ax.set(xlabel="c (threshold L = c L*)", ylabel="mean first-passage time η·steps", title="escape: t_p ∝ c^slope")
        ax.set_xticks(s["passage"]["rows"][0]["thresholds"] if s["passage"]["rows"] else [])
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
        save_figure(plt, fig, out, "fig_passage.png", written)
    if "noise" in s:
        n = s["noise"]
        N, L = np.array(n["noise_strength"]), np.array(n["loss"])
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].loglog(L, N, ".-", ms=3)
        g = n["late_slope"]
        xs = np.array([g["x_min"], g["x_max"]])
        ax[0].loglog(xs, np.exp(g["log_prefactor"]) * xs ** g["exponent"], "k-", label=f"late slope {g['exponent']:.3f}")
        ax[0].set(xlabel="L", ylabel="noise strength N(t)", title=f"N(t) vs L (η {n['lr']:g})")
        ax[0].legend(fontsize=7)
        ax[1].semilogy(n["epochs"], N / L, ".-", ms=3)
        ax[1].set(xlabel="epoch", ylabel="N(t) / L")
        save_figure(plt, fig, out, "fig_noise_strength.png", written)
    if "decoupling" in s:
        d = s["decoupling"]
        fig, axes = plt.subplots(1, len(d["spectra"]), figsize=(4.5 * len(d["spectra"]), 3.8), squeeze=False)
        for ax, e, p in zip(axes[0], d["epochs"], d["spectra"]):
            a, b = np.log10(p["A"]), np.log10(p["B"])
            bins = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 40)
            ax.hist(a, bins, alpha=0.5, label="(1/N) Σ ℓ_μ C_f^μ")
            ax.hist(b, bins, alpha=0.5, label="L (1/N) Σ C_f^μ")
            ax.set(yscale="log", xlabel="log10 eigenvalue", title=f"epoch {e}")
            ax.legend(fontsize=7)
        save_figure(plt, fig, out, "fig_decoupling.png", written)


def write_escape_rate_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Power-law escape rate of SGD (Mori et al. 2022)", "", "## Paper's claims", ""]
    lines += checks_table(s["checks"]) + [""]
    if "stationary" in s:
        lines += [f"## Stationary distribution (1-D linear regression, N = {cfg['stationary_samples']}, "
                  f"{cfg['chains']} chains × {cfg['samples_per_chain']} samples every {cfg['sample_every']} steps)", "",
                  "| η | B | h* | φ (MLE ± s.e.) | 1 + B/(η h*) | relative |", "|---:|---:|---:|---|---:|---:|"]
        lines += [f"| {r['lr']:g} | {r['batch_size']} | {r['h']:.4f} | {r['phi']:.2f} ± {r['phi_stderr']:.2f} | "
                  f"{r['theory']:.2f} | {r['relative_error']:+.1%} |" for r in s["stationary"]["rows"]] + [""]
    if "passage" in s:
        k = len(s["passage"]["rows"][0]["datasets"]) if s["passage"]["rows"] else 0
        lines += [f"## First passage (N = {cfg['passage_samples']}, B = {cfg['passage_batch_size']}, η = "
                  f"{cfg['passage_lr']:g}, {cfg['passage_runs']} runs from θ* on each of {k} datasets, "
                  f"c ∈ {list(cfg['passage_thresholds'])})", "",
                  "Slope of log t_p on log c: mean ± s.d. over the datasets [95 % CI of the mean] (lowest–highest). "
                  "References: the exact mean passage time of the theory's SDE (decoupled noise 2LH/B, isotropic h*) "
                  "at the same c, and its large-c limit B/(η h*) + 1 − d/2.", "",
                  "| d | h* (largest) | slope | SDE at these c | relative | B/(η h*) + 1 − d/2 | relative |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['dim']} | {r['h']:.4f} | {r['slope']:.2f} ± {r['slope_sd']:.2f} [{r['slope_ci95'][0]:.2f}, "
                  f"{r['slope_ci95'][1]:.2f}] ({r['slope_range'][0]:.2f}–{r['slope_range'][1]:.2f}) | {r['sde_slope']:.2f} | "
                  f"{r['relative_error_sde']:+.1%} | {r['theory']:.2f} | {r['relative_error']:+.1%} |"
                  for r in s["passage"]["rows"]] + [""]
    if "noise" in s:
        n, g = s["noise"], s["noise"]["late_slope"]
        lines += [f"## Noise strength along training ({cfg['dataset']}, even/odd, {cfg['train_samples']} images, "
                  f"in-{cfg['hidden']}-{cfg['hidden']}-1, MSE, η {n['lr']:g}, B {cfg['batch_size']})", "",
                  f"Late-time (epochs ≥ {n['late_from_epoch']}) slope of log 𝒩 on log L: **{g['exponent']:.3f}** "
                  f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}], R² {g['r2']:.3f}; L fell from {fmt(n['loss'][0])} to "
                  f"{fmt(n['loss'][-1])}, 𝒩 from {fmt(n['noise_strength'][0])} to {fmt(n['noise_strength'][-1])}.", ""]
    if "decoupling" in s:
        d = s["decoupling"]
        lines += [f"## Decoupling (η {cfg['decoupling_lr']:g}, B {cfg['batch_size']}; spectra on {d['samples']} samples)",
                  "", "| epoch | L | eigenvalues | median abs. log10 ratio, top half | smallest tenth | top-10 relative "
                  "difference |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {e} | {fmt(p['loss'])} | {len(p['A'])} | {p['log_ratio_top']:.3f} | {p['log_ratio_bottom']:.3f} | "
                  f"{p['top_relative']:.3f} |" for e, p in zip(d["epochs"], d["spectra"])] + [""]
        # where along the spectrum the two part: the median |log10 ratio| in each tenth of the ranks
        lines += ["Median |log10(a_i / b_i)| in each tenth of the eigenvalues, largest tenth first:", "",
                  "| epoch | " + " | ".join(f"{10 * i}–{10 * i + 10} %" for i in range(10)) + " |",
                  "|---:|" + "---:|" * 10]
        for e, p in zip(d["epochs"], d["spectra"]):
            ratio = np.abs(np.log10(np.asarray(p["A"]) / np.asarray(p["B"])))
            tenths = [np.median(part) for part in np.array_split(ratio, 10)]
            lines.append(f"| {e} | " + " | ".join(f"{t:.2f}" for t in tenths) + " |")
        lines.append("")
    return write_report(out, lines, s, _escape_figures)
