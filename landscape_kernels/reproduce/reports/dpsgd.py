"""``report.md`` and figures of ``reproduce dpsgd`` (Zhang et al. 2021)."""
import numpy as np

from .common import checks_table, fmt, save_figure, write_report

MARKS = {"converged": "o", "did not converge": "s", "diverged": "x"}


def _state(r):
    return "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"


def _convergence_map(plt, out, s, written):
    runs = s["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, algorithm in zip(axes, ("ssgd", "dpsgd")):
        for state, mark in MARKS.items():
            pts = [(r["lr"], r["total_batch"]) for r in runs if r["algorithm"] == algorithm and _state(r) == state]
            if pts:
                ax.scatter(*zip(*pts), marker=mark, s=60, label=state,
                           color={"converged": "C2", "did not converge": "C1", "diverged": "C3"}[state])
        ax.set(xscale="log", yscale="log", xlabel="learning rate α", title=algorithm.upper())
        lrs = sorted({r["lr"] for r in runs})
        ax.set_xticks(lrs, [f"{v:g}" for v in lrs])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    batches = sorted({r["total_batch"] for r in runs})
    axes[0].set_yticks(batches, [str(b) for b in batches])
    axes[0].set_ylabel("total batch n b")
    save_figure(plt, fig, out, "fig_convergence_map.png", written)


def _along_training(plt, out, s, written):
    runs = [r for r in s["runs"] if r["algorithm"] == "dpsgd" and not r["diverged"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for k, r in enumerate(runs):
        recs = r["records"]
        label = f"n {r['learners']}, α {r['lr']:g}"
        steps = [q["step"] for q in recs[1:] if q.get("effective_lr_ratio") is not None]
        axes[0].plot(steps, [q["effective_lr_ratio"] for q in recs[1:] if q.get("effective_lr_ratio") is not None],
                     "o-", ms=3, lw=1, color=f"C{k % 10}", label=label)
        axes[1].plot([q["step"] for q in recs if "eigenvalues" in q],
                     [q["eigenvalues"][0] * r["lr"] / 2 for q in recs if "eigenvalues" in q], lw=1, color=f"C{k % 10}")
        axes[2].plot([q["step"] for q in recs[1:] if q.get("alignment") is not None],
                     [q["alignment"] / q["isotropic"] for q in recs[1:] if q.get("alignment") is not None], lw=1,
                     color=f"C{k % 10}")
    axes[0].axhline(1, color="k", lw=0.6, ls=":")
    axes[0].set(xlabel="step", ylabel="α_e / α (interval mean)", title="DPSGD's effective learning rate")
    axes[0].legend(fontsize=5, ncol=2)
    axes[1].axhline(1, color="k", lw=0.6, ls=":")
    axes[1].set(xlabel="step", ylabel="λ_1 α / 2 at w_a", yscale="log", title="sharpness (1 = GD's stability edge)")
    axes[2].set(xlabel="step", ylabel="share in top-k / isotropic", yscale="log",
                title="the replicas' spread along the sharp directions")
    save_figure(plt, fig, out, "fig_effective_lr.png", written)


def write_dpsgd_report(out, s, arrays=None):
    cfg = s["config"]
    lines = ["# Decentralized parallel SGD against synchronous SGD (Zhang et al. 2021)", "",
             f"{cfg['dataset']}, {cfg['train_samples']} training samples in equal shards, MLP in-{cfg['hidden']}-10 "
             f"(ReLU), {s['mode']}; per-learner batch {cfg['batch_size']}, {cfg['steps']} steps, DPSGD on the "
             f"{cfg['topology']} graph (mixing {cfg['combine']} the local step). Converged: the last tenth's mean "
             f"training loss below {cfg['converged_loss']:g}× the initial; diverged: a training loss above "
             f"{cfg['diverged_loss']:g}× the initial. Measured every {cfg['measure_every']} steps at the averaged "
             f"weights on {cfg['subset']} fixed samples; α_e/α is the mean over the interval before.", "",
             "## Claims", ""] + checks_table(s["checks"])
    lines += ["", "## Runs", "",
              "| n | total batch | α | algorithm | state | final training loss | final accuracy | final λ_1 | "
              "λ_1 α / 2 | mean α_e / α | median spread share / isotropic |",
              "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in s["runs"]:
        ratios = [q["effective_lr_ratio"] for q in r["records"][1:] if q.get("effective_lr_ratio") is not None]
        shares = [q["alignment"] / q["isotropic"] for q in r["records"][1:] if r["algorithm"] == "dpsgd"
                  and q.get("alignment") is not None and np.isfinite(q["alignment"])]
        lam = r["final_lambda1"]
        lines.append(f"| {r['learners']} | {r['total_batch']} | {r['lr']:g} | {r['algorithm']} | {_state(r)} | "
                     f"{fmt(r['final_train_loss'])} | {fmt(r['final_accuracy'])} | {fmt(lam)} | "
                     f"{fmt(lam * r['lr'] / 2 if lam is not None else None)} | "
                     f"{fmt(float(np.mean(ratios)) if ratios else None)} | "
                     f"{fmt(float(np.median(shares)) if shares else None)} |")

    def draw(plt, out_, s_, written):
        _convergence_map(plt, out_, s_, written)
        _along_training(plt, out_, s_, written)

    return write_report(out, lines, s, draw)
