"""``report.md`` and figures of ``reproduce flat-valley`` (Yang, Tang & Tu 2023; Yang et al. 2026)."""
import numpy as np

from .common import checks_table, fmt, save_figure, write_report


def _paths_figure(plt, out, s, written):
    d = s["drift"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    ax = axes[0]
    with_paths = [r for r in d["rows"] if r.get("paths")]
    w = np.linspace(0.15, 4.0, 200)
    ax.plot(w, d["valley"] / w, "k-", lw=0.8, label="valley w1 w2 = b*")
    if with_paths:
        r = with_paths[0]
        paths = np.array(r["paths"])  # (records, chains, 2)
        for c in range(paths.shape[1]):
            ax.plot(paths[:, c, 0], paths[:, c, 1], lw=0.6, alpha=0.8, color=f"C{c % 10}")
        ax.set_title(f"SGD chains (lr {r['lr']:g}, B {r['batch_size']}) and GD")
    gd = np.array(d["gd"]["paths"])[:, 0]
    ax.plot(gd[:, 0], gd[:, 1], "k--", lw=1.2, label="GD")
    ax.plot(*d["start"], "ko", ms=4)
    ax.set(xlabel="w1", ylabel="w2", xlim=(0, 4), ylim=(0, 2.5))
    ax.legend(fontsize=7)
    ax = axes[1]
    for k, r in enumerate(d["rows"]):
        steps = np.arange(len(r["mean_position"])) * s["config"]["record_every"]
        ax.plot(steps, r["mean_position"], color=f"C{k}", lw=1, label=f"lr {r['lr']:g}, B {r['batch_size']}")
        ax.plot(steps, r["theory"]["mean_position"], color=f"C{k}", ls="--", lw=0.8)
    ax.set(xlabel="SGD step", ylabel="mean valley position D = w1² − w2²", yscale="log",
           title="chains (solid) against the theory (dashed)")
    ax.legend(fontsize=6)
    save_figure(plt, fig, out, "fig_valley_paths.png", written)


def _noise_figure(plt, out, s, written):
    fig, axes = plt.subplots(1, 2 if "noise" in s and "drift" in s else 1, figsize=(9.5, 3.6), squeeze=False)
    axes = list(axes[0])
    if "drift" in s:
        ax = axes.pop(0)
        d = s["drift"]
        for B in sorted({r["batch_size"] for r in d["rows"]}):
            rows = [r for r in d["rows"] if r["batch_size"] == B]
            ax.plot([r["lr"] for r in rows], [r["end_sharpness_median"] for r in rows], "o-", label=f"SGD, B {B}")
        ax.axhline(d["gd"]["end_sharpness"], color="k", ls="--", lw=1, label="GD")
        lrs = sorted({r["lr"] for r in d["rows"]})
        ax.set(xlabel="lr", ylabel="end sharpness / flattest", xscale="log", title=f"after {s['config']['steps']} steps")
        ax.minorticks_off()
        ax.set_xticks(lrs, [f"{v:g}" for v in lrs])
        ax.legend(fontsize=7)
    if "noise" in s:
        ax = axes.pop(0)
        n = s["noise"]
        rows = n["rows"]
        sc = [r["scale"] for r in rows]
        ax.plot(sc, [r["median_steps_to_flat"] or np.nan for r in rows], "o-", label="median steps to flat")
        ax.plot(sc, [r["theory_steps_to_flat"] or np.nan for r in rows], "k--", lw=0.8, label="theory")
        ax.set(xlabel="noise scale s (batch variance × s²)", ylabel="steps", xscale="log", yscale="log",
               title=f"lr {n['lr']:g}, B {n['batch_size']}; dotted: the theory's bound")
        ax.minorticks_off()
        ax.set_xticks(sc, [f"{v:g}" for v in sc])
        twin = ax.twinx()
        twin.plot(sc, [r["failed"] for r in rows], "C3.-", lw=0.8, label="failed")
        twin.plot(sc, [r["collapsed"] for r in rows], "C4:", lw=0.8, label="collapsed to w = 0")
        twin.plot(sc, [r["diverged"] for r in rows], "C5:", lw=0.8, label="diverged")
        twin.set(ylabel="share of chains", ylim=(-0.02, 1.02))
        if n["theory_bound"]:
            ax.axvline(n["theory_bound"], color="k", lw=0.8, ls=":")
        ax.legend(fontsize=6, loc="upper center")
        twin.legend(fontsize=6, loc="center right")
    save_figure(plt, fig, out, "fig_flatness_vs_noise.png", written)


def _network_figure(plt, out, s, written):
    runs = [r for r in s["network"]["runs"] if r["seed"] == min(q["seed"] for q in s["network"]["runs"])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for k, r in enumerate(sorted(runs, key=lambda r: r["noise"])):
        label = f"lr {r['lr']:g}, B {r['batch_size']}"
        axes[0].plot(r["snapshot_epochs"], r["lambda1"], color=f"C{k}", lw=1, label=label)
        esc = r["freezing"]["escape_times"]
        if esc:
            axes[0].plot(esc, np.interp(esc, r["snapshot_epochs"], r["lambda1"]), "v", color=f"C{k}", ms=4)
        axes[0].axvline(r["freezing"]["time"], color=f"C{k}", lw=0.6, ls=":")
        frob = [(e, f) for e, f in zip(r["snapshot_epochs"], r["frobenius"]) if f is not None]
        if frob:
            axes[1].plot(*zip(*frob), color=f"C{k}", lw=1, label=label)
    axes[0].set(xlabel="epoch", ylabel="λ_1", yscale="log", title="λ_1 along training; ▼ escapes, dotted: freezing")
    axes[1].set(xlabel="epoch", ylabel="‖H‖_F", yscale="log", title="‖H‖_F along training")
    for ax in axes[:2]:
        ax.legend(fontsize=6)
    ax = axes[2]
    table = s["network"]["settings"]
    noise = [t["noise"] for t in table]
    ax.plot(noise, [t["freezing_epoch"] for t in table], "o-", label="freezing epoch")
    ax.set(xlabel="lr / B", ylabel="freezing epoch", xscale="log")
    ax.minorticks_off()
    ax.set_xticks(sorted(set(noise)), [f"{v:g}" for v in sorted(set(noise))])
    twin = ax.twinx()
    twin.plot(noise, [t["final_lambda1"] for t in table], "C3s--", label="final λ_1")
    twin.set(ylabel="final λ_1", yscale="log")
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    save_figure(plt, fig, out, "fig_network_freezing.png", written)


def write_flat_valley_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Effective landscape-dependent regularisation and transient freezing (Yang, Tang & Tu 2023; "
             "Yang et al. 2026)", "",
             f"Valley model: {cfg['samples']} samples with per-sample loss a_i (w1 w2 − b_i)² / 2 (b* = 1, b spread "
             f"{cfg['b_spread']:g}, log-normal a spread {cfg['a_spread']:g}); {cfg['chains']} chains per setting from one "
             f"start below the valley at {cfg['start_sharpness']:g}× the flattest sharpness; minibatches drawn with "
             f"replacement; 'flat' = within {cfg['flat_tolerance']:.0%} of the flattest sharpness. The theory (derived in "
             "the docs page): SGD moves the valley position D = w1² − w2² by the factor 1 − lr² g² per step, which is "
             "gradient descent on the effective loss L + (lr/4) E|∇ℓ_μ − ∇L|² (continuous time) times the discrete "
             "step's factor 1 / (1 − lr E[A²] S / 2ā). No public code; the escape and freezing rules are ours.", "",
             "## Claims", ""] + checks_table(s["checks"])
    if "drift" in s:
        d = s["drift"]
        lines += ["", f"## Drift along the valley ({cfg['steps']} steps)", "",
                  f"Start: D_0 = {d['start_position']:.4g} (sharpness {d['start_sharpness']:.3g}× the flattest); GD "
                  f"(lr {d['gd']['lr']:g}) ends at D = {d['gd']['end_position']:.4g}, sharpness "
                  f"{d['gd']['end_sharpness']:.4g}× the flattest.", "",
                  "−ln(D/D_0) is taken at the end, or at the last record where the theory's D is still above 10⁻⁶ D_0 "
                  "(the step in the table; below it the chains' mean D is at the rounding level of w1² − w2²).", "",
                  "| lr | B | σ_v² | step | −ln(D/D_0) | theory | error | end sharpness / flattest (median) | flat | "
                  "median steps to flat | theory steps | failed |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            t = r["theory"]
            lines.append(f"| {r['lr']:g} | {r['batch_size']} | {fmt(t['variance'])} | {r['compared_at_step']} | "
                         f"{fmt(r['log_drift'])} | "
                         f"{fmt(r['theory_log_drift'])} | {fmt(r['relative_error'])} | {fmt(r['end_sharpness_median'])} | "
                         f"{r['flat_share']:.0%} | {fmt(r['median_steps_to_flat'])} | {fmt(t['steps_to_flat'])} | "
                         f"{r['failed']:.1%} |")
    if "noise" in s:
        n = s["noise"]
        lines += ["", f"## Noise strength (lr {n['lr']:g}, B {n['batch_size']}; b_i − b* scaled by s)", "",
                  f"Theory's bound (the saddle w = 0 attracts once max(E ln|1 ± lr C_μ|) < 0): s = {fmt(n['theory_bound'])}; "
                  f"measured (half the chains failed): s = {fmt(n['measured_bound'])}.", "",
                  "| s | σ_v² | median steps to flat | theory | flat | collapsed | diverged |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in n["rows"]:
            lines.append(f"| {r['scale']:g} | {fmt(r['variance'])} | {fmt(r['median_steps_to_flat'])} | "
                         f"{fmt(r['theory_steps_to_flat'])} | {r['flat_share']:.0%} | {r['collapsed']:.1%} | "
                         f"{r['diverged']:.1%} |")
    if "network" in s:
        lines += ["", f"## Network ({cfg['dataset']}, {cfg['train_samples']} samples, MLP in-{cfg['hidden']}-"
                      f"{cfg['hidden']}-10, {cfg['epochs']} epochs, {cfg['snapshots_per_epoch']} snapshots per epoch)", "",
                  f"Escape: the loss SGD went through (on the fixed subset, every {cfg['loss_every']} steps) rose above "
                  f"the line between the interval's ends by more than {cfg['barrier_threshold']:g}× the initial loss and "
                  f"λ_1 fell by at least {cfg['sharpness_drop']:.0%}; freezing time: the end of the last escape. The "
                  "straight-path barrier between the same snapshots (the same threshold) is counted beside it.", "",
                  "| lr | B | lr/B | runs | escapes | early share | freezing epoch | straight-path escapes | final λ_1 | "
                  "final loss |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in s["network"]["settings"]:
            lines.append(f"| {t['lr']:g} | {t['batch_size']} | {t['noise']:.4g} | {t['runs']} | {t['escapes']:.3g} | "
                         f"{fmt(t['early_share'])} | {t['freezing_epoch']:.3g} | {t['straight_escapes']:.3g} | "
                         f"{t['final_lambda1']:.4g} | {t['final_loss']:.4g} |")

    def draw(plt, out_, s_, written):
        if "drift" in s_:
            _paths_figure(plt, out_, s_, written)
        if "drift" in s_ or "noise" in s_:
            _noise_figure(plt, out_, s_, written)
        if "network" in s_:
            _network_figure(plt, out_, s_, written)

    return write_report(out, lines, s, draw)
