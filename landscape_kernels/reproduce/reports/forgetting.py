"""``report.md`` and figures of ``reproduce forgetting`` (Feng & Tu 2021, landscape-dependent constraints)."""
import numpy as np

from ...analyses.forgetting import XI_FACTOR
from .common import save_figure, write_report


def _penalty_stability_note(s):
    """Plain SGD on a penalty with curvature c along a direction is stable only while lr * c < 2."""
    cfg = s["config"]
    if cfg.get("integrator", "explicit") == "proximal":
        return ("The penalties are applied by their exact proximal (implicit) step after every SGD step on the "
                "task-2 loss, which is stable for any λ.")
    lr, f_min = cfg["lr"], min(s["task1"]["xi"]) / XI_FACTOR
    return (f"Stability of the penalised SGD: along p_1i the quadratic LDC has curvature 2λ/F_1i² and the hinge "
            f"form 2λ (outside ξ_i), so SGD at α = {lr:g} diverges or oscillates once λ ≥ F_min²/α = "
            f"{f_min ** 2 / lr:.3g} (quadratic, F_min = {f_min:.3g}) or λ ≥ 1/α = {1 / lr:.3g} (hinge); "
            "such runs are marked nan (diverged).")


def _matched_table(s):
    rows = s.get("matched_eps2")
    if not rows:
        return []
    methods = [m for m in ("ldc-quadratic", "ldc-hinge", "ewc", "ewc-top") if m in rows[0]]
    lines = ["", "ε1 at matched ε2 (linear interpolation along each λ sweep; – where a sweep does not reach that ε2):",
             "(LDC lower than EWC: by more than twice the standard error of the difference on the task-1 test set, "
             "else a tie)", "", "| ε2 | " + " | ".join(methods) + " | LDC lower than EWC |", "|---:|" + "---:|" * len(methods) + "---|"]
    for r in rows:
        verdict = r["ldc_beats_ewc"] or "–"
        lines.append(f"| {r['eps2']:g} | " + " | ".join("–" if r[m] is None else f"{r[m]:.3f}" for m in methods)
                     + f" | {verdict} |")
    return lines


def _forgetting_figures(plt, out, s, written):
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in s["runs"]:
        epochs = np.arange(1, len(r["curve"]) + 1)
        ax[0].plot(epochs, [c["eps1"] for c in r["curve"]], label=r["method"])
        ax[1].plot(epochs, [c["eps2"] for c in r["curve"]], label=r["method"])
    ax[0].set(xlabel="task-2 epoch", ylabel="ε1 (task-1 test error)", title="forgetting of task 1")
    ax[1].set(xlabel="task-2 epoch", ylabel="ε2 (task-2 test error)", title="learning of task 2")
    ax[0].legend(fontsize=7)
    save_figure(plt, fig, out, "fig_errors.png", written)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    xi = np.array(s["task1"]["xi"])
    for r in s["runs"]:
        if r["q"] is not None:
            ax[0].plot(np.abs(np.array(r["q"])), ".", label=r["method"])
    ax[0].plot(xi, "k_", label="ξ_i = 0.008 F_1i")
    ax[0].set(yscale="log", xlabel="constrained direction (sharpest first)", ylabel="|q_i|", title="displacement vs ξ_i")
    ax[0].legend(fontsize=7)
    for method in ("ldc-quadratic", "ldc-hinge", "ewc", "ewc-top"):
        pts = sorted((r for r in s["lambda_sweep"] if r["method"] == method), key=lambda r: r["lam"])
        if pts:
            ax[1].plot([r["eps2"] for r in pts], [r["eps1"] for r in pts], "o-", label=method)
        pts = [r for r in s["constraint_sweep"] if r["method"] == method]
        if pts:
            ax[2].plot([r["num_constraints"] for r in pts], [r["eps1"] + r["eps2"] for r in pts], "o-", label=method)
    ax[1].set(xlabel="ε2", ylabel="ε1", title="trade-off over λ")
    ax[2].set(xscale="log", xlabel="N_c", ylabel="ε1 + ε2", title="constraints needed")
    ax[1].legend(fontsize=7)
    save_figure(plt, fig, out, "fig_tradeoffs.png", written)


def write_forgetting_report(out, s, arrays=None):
    """Figures and report.md of a ``reproduce forgetting`` summary."""
    cfg, t1 = s["config"], s["task1"]
    space = "+".join(t1.get("space", ["2.weight"]))
    lines = [f"# Landscape-dependent constraints against forgetting (Feng & Tu 2021): {s['dataset']}", "",
             f"landscape_kernels {s['library_version']}; task 1 = digits (0, 1) for {cfg['task1_epochs']} epochs, then "
             f"task 2 = digits (2, 3) for {cfg['task2_epochs']} epochs from the same w1*; B = {cfg['batch_size']}, "
             f"α = {cfg['lr']}; {cfg.get('head', 'shared')} head; LDC on the N_c = {cfg['num_constraints']} sharpest "
             f"task-1 PCs of {space} ({t1.get('space_size', '?')} numbers; {len(t1['pcs'])} PCs measured); EWC on "
             f"the diagonal Fisher of all {t1.get('num_weights', '?')} weights (ewc) or its N_c largest entries "
             f"(ewc-top); {s['seconds']:.0f} s in all.", "",
             _penalty_stability_note(s), "",
             "| method | λ | N_c | ε1 (task 1) | ε2 (task 2) |", "|---|---:|---:|---:|---:|"]
    if "test_error" in t1:
        lines[2] += f" Task-1 test error after task 1: {t1['test_error']:.4f}."
    if "fisher" in t1:
        f = t1["fisher"]
        lines[2] += (f" Diagonal Fisher of task 1: largest {f['max']:.3g}, median {f['median']:.3g}, mean "
                     f"{f['mean']:.3g}.")
    for r in s["runs"]:
        lines.append(f"| {r['method']} | {r['lam']:g} | {r['num_constraints']} | {r['eps1']:.3f} | {r['eps2']:.3f} |")
    lines += ["", "λ sweep (final errors):", "", "| method | λ | ε1 | ε2 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['lam']:g} | {r['eps1']:.3f} | {r['eps2']:.3f} |" for r in s["lambda_sweep"]]
    lines += _matched_table(s)
    lines += ["", "N_c sweep:", "", "| method | N_c | ε1 + ε2 |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['num_constraints']} | {r['eps1'] + r['eps2']:.3f} |" for r in s["constraint_sweep"]]
    return write_report(out, lines, s, _forgetting_figures)
