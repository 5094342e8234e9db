"""``report.md`` and figures of ``reproduce effective-gan`` (Durr, Mroueh, Tu & Wang 2023)."""
import math

import numpy as np

from .common import checks_table, fmt, save_figure, write_report

SHOWN_PARTICLES = 12  # particle images per setting in the particle figure


def _shown(t):
    return t if isinstance(t, str) else f"{t:.3g}"


def _grid_runs(s):
    runs = [("phases", s["phases"])] if "phases" in s else []
    if "discriminator" in s:
        runs += [(f"discriminator{k}", v) for k, v in enumerate(s["discriminator"]["variants"])]
    return runs


def _heatmaps(plt, out, s, written):
    runs = _grid_runs(s)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.3 * len(runs), 3.8), squeeze=False)
    for ax, (_, r) in zip(axes[0], runs):
        grid = np.array([[np.nan if v is None else v for v in row] for row in r["final_diversity"]])
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=2 * r["level"])
        phis, lrs = r["phis"], r["disc_lrs"]
        ax.set_xticks(range(len(phis)), [f"{p:g}" for p in phis], fontsize=7, rotation=45)
        ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7)
        # the transition line: φ_c as a fractional grid index (log spacing between positive grid points)
        xs, ys = [], []
        for i, t in enumerate(r["transitions"]):
            if isinstance(t, str):
                continue
            k = next(j for j in range(1, len(phis)) if phis[j] >= t)
            lo, hi = phis[k - 1], phis[k]
            f = (math.log(t) - math.log(lo)) / (math.log(hi) - math.log(lo)) if lo > 0 else (t - lo) / (hi - lo)
            xs.append(k - 1 + f)
            ys.append(i)
        ax.plot(xs, ys, "w.-", lw=1.5, label="transition (score = ½ log N)")
        ax.set(xlabel="φ = g2/g1", ylabel="discriminator lr", title=f"diversity at T, {r['activation']}-{r['hidden']}")
        ax.legend(fontsize=6, loc="lower left")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(plt, fig, out, "fig_phase_diagram.png", written)


def _diversity_over_time(plt, out, s, written):
    r = s["phases"]
    lrs, phis = r["disc_lrs"], r["phis"]
    rows = sorted({0, len(lrs) // 2, len(lrs) - 1})
    fig, axes = plt.subplots(1, len(rows), figsize=(4.3 * len(rows), 3.4), squeeze=False)
    steps = r["records"]["step"]
    for ax, i in zip(axes[0], rows):
        for j, phi in enumerate(phis):
            series = [rec[i * len(phis) + j] for rec in r["records"]["diversity"]]
            ax.plot(steps, [np.nan if v is None else v for v in series], lw=1, color=plt.cm.plasma(j / len(phis)),
                    label=f"φ {phi:g}")
        ax.axhline(r["level"], color="k", ls=":", lw=0.8)
        ax.set(xlabel="step", ylabel="diversity score", title=f"lr_D {lrs[i]:g}", ylim=(0, 2.1 * r["level"]))
        ax.legend(fontsize=6, ncol=2)
    save_figure(plt, fig, out, "fig_diversity.png", written)


def _particles(plt, out, s, arrays, written):
    if "phases" not in arrays:
        return
    r = s["phases"]
    x = arrays["phases"]["particles"].float().numpy()  # (lrs, phis, N, d)
    targets = arrays["phases"]["targets"].float().numpy()
    side = r["pixels"]["side"]
    i = len(r["disc_lrs"]) // 2
    cols = sorted({0, len(r["phis"]) // 2, len(r["phis"]) - 1})
    n = min(SHOWN_PARTICLES, x.shape[2])
    fig, axes = plt.subplots(len(cols) + 1, n, figsize=(n * 0.8, (len(cols) + 1) * 0.95))
    rows = [("targets", targets[:n])] + [(f"φ {r['phis'][j]:g}", x[i, j, :n]) for j in cols]
    for a, (label, imgs) in enumerate(rows):
        for b in range(n):
            ax = axes[a, b]
            ax.imshow(imgs[b].reshape(side, side), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"particles at T (lr_D {r['disc_lrs'][i]:g}); top: the first targets", fontsize=8)
    save_figure(plt, fig, out, "fig_particles.png", written)


def _damping(plt, out, s, written):
    d = s["damping"]
    rows = d["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    for k, r in enumerate(rows):
        t = np.arange(len(r["along"])) * d["record_stride"]
        ax.plot(t, r["along"], lw=1, color=plt.cm.viridis(k / max(1, len(rows) - 1)), label=f"γ {r['penalty']:g}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="step", ylabel="centre offset along the start direction",
           title="the particles' centre of mass")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    pens = [max(r["penalty"], 1e-3) for r in rows]
    ax.plot(pens, [np.nan if r["convergence_step"] is None else r["convergence_step"] for r in rows], "o-",
            label="convergence step")
    ax.set(xlabel="gradient penalty γ (0 drawn at 1e-3)", ylabel="steps to converge", xscale="log")
    twin = ax.twinx()
    twin.plot(pens, [np.nan if r["fit"] is None else r["fit"]["damping_ratio"] for r in rows], "C1s--",
              label="damping ratio ζ (fit)")
    twin.axhline(1, color="C1", lw=0.6, ls=":")
    twin.set(ylabel="ζ")
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    save_figure(plt, fig, out, "fig_damping.png", written)


def _grid_table(r):
    phis = r["phis"]
    lines = ["| lr_D | " + " | ".join(f"φ {p:g}" for p in phis) + " | φ_c |",
             "|---:|" + "---:|" * (len(phis) + 1)]
    for lr, row, cov, t in zip(r["disc_lrs"], r["final_diversity"], r["final_covered"], r["transitions"]):
        lines.append(f"| {lr:g} | " + " | ".join(f"{fmt(v)} ({c})" for v, c in zip(row, cov)) + f" | {_shown(t)} |")
    return lines


def write_effective_gan_report(out, s, arrays=None):
    arrays = arrays or {}
    cfg = s["config"]
    lines = ["# The effective particle model of GAN training (Durr, Mroueh, Tu & Wang 2023)", "",
             f"{cfg['targets']} particles x_i chase {cfg['targets']} target images ({cfg['dataset']}, standardised) "
             f"through a discriminator MLP: x_i ← x_i − lr_x Σ_j K_ij ∇ softplus(−s(x_j)), K = (1 − φ) I + φ 11ᵀ "
             f"(g1 = 1, φ = g2/g1), lr_x {cfg['particle_lr']:g}, start N(0, {cfg['init_scale']:g}²); the "
             f"discriminator ({cfg['disc_optimizer']}, weight decay {cfg['weight_decay']:g}) descends the GAN loss, "
             "both players step at once. Diversity score: log N + Σ p log p with p_k the share of particles whose "
             "nearest target (cosine) is image k (the authors' analysis); 0 = every particle on its own image, "
             "log N = all on one. The transition φ_c: where the score at T crosses ½ log N.", "",
             "## Claims", ""] + checks_table(s["checks"])
    for label, r in _grid_runs(s):
        lines += ["", f"## Phase diagram, discriminator {r['activation']}-{r['hidden']} (T = {cfg['steps']})", "",
                  "Diversity score at T (in brackets: how many targets are some particle's nearest). "
                  f"Settings whose particles diverged: {r['diverged']}.", ""] + _grid_table(r)
        lines += ["", "The score with the other count (p_k the share of targets whose nearest particle is k):", "",
                  "| lr_D | " + " | ".join(f"φ {p:g}" for p in r["phis"]) + " |",
                  "|---:|" + "---:|" * len(r["phis"])]
        for lr, row in zip(r["disc_lrs"], r["final_diversity_targets"]):
            lines.append(f"| {lr:g} | " + " | ".join(fmt(v) for v in row) + " |")
        lines += ["", "Mean cosine distance of a particle to its nearest target at T (particles far from every "
                      "target make either score meaningless):", "",
                  "| lr_D | " + " | ".join(f"φ {p:g}" for p in r["phis"]) + " |",
                  "|---:|" + "---:|" * len(r["phis"])]
        for lr, row in zip(r["disc_lrs"], r["final_nearest_distance"]):
            lines.append(f"| {lr:g} | " + " | ".join(fmt(v) for v in row) + " |")
    if "damping" in s:
        d = s["damping"]
        lines += ["", f"## Critical damping ({cfg['targets']} particles against {cfg['targets']} targets in "
                      f"{d['dim']} dimensions, φ {d['phi']:g}, SGD discriminator lr {d['disc_lr']:g}, lr_x "
                      f"{d['particle_lr']:g}, {cfg['damping_steps']} steps)", "",
                  f"Convergence step: the first after which the centre of mass stays within {cfg['tolerance']:g}× "
                  "its starting distance of the targets' centre. Fit: u_{t+2} = a u_{t+1} + b u_t on the centre's "
                  "offset along the start direction from where its distance first halves; ζ the damping ratio of "
                  "the matching linear oscillator (< 1 oscillates, 1 critical, > 1 creeps).", "",
                  "| γ | convergence step | ζ | ω_0 | decay rate | oscillation frequency | R² | final distance |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            f = r["fit"] or {}
            lines.append(f"| {r['penalty']:g} | {fmt(r['convergence_step'])} | {fmt(f.get('damping_ratio'))} | "
                         f"{fmt(f.get('natural_frequency'))} | {fmt(f.get('decay_rate'))} | {fmt(f.get('frequency'))} | "
                         f"{fmt(f.get('r2'))} | {fmt(r['final_distance'])} |")

    def draw(plt, out_, s_, written):
        if _grid_runs(s_):
            _heatmaps(plt, out_, s_, written)
        if "phases" in s_:
            _diversity_over_time(plt, out_, s_, written)
            _particles(plt, out_, s_, arrays, written)
        if "damping" in s_:
            _damping(plt, out_, s_, written)

    return write_report(out, lines, s, draw)
