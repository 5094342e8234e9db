"""``landscape-kernels reproduce flat-valley``: SGD's effective landscape-dependent regularisation on a
degenerate valley (Yang, Tang & Tu, PRL 130, 237101, 2023) and transient freezing in a network (Yang
et al., arXiv 2601.10962); ``docs/reproductions/flat-valley.md``.

Three parts, each kept in ``OUT/parts.json`` as it finishes (``--resume`` reuses them):

- ``drift``: thousands of SGD chains on the valley model (``analyses.valley``) from one sharp start,
  for every (lr, B) of a grid, with GD beside them: the chains' mean position along the valley against
  the theory (the effective loss's drift with its discrete-step factor), the sharpness reached;
- ``noise``: at one (lr, B), the batch-to-batch variance scaled up (every b_i - b* times s): the time
  to reach the flat end of the valley and the share of chains that fail (collapse onto the saddle
  w = 0 or diverge), against the theory's time and its bound on s;
- ``network``: an MLP trained by SGD for every (lr, B) of a grid with lambda_1 and ||H||_F tracked and
  the valley changes between snapshots watched (``analyses.freezing``): escapes, the freezing time and
  the final sharpness against lr/B. Each run lives in ``OUT/network/lr{lr}_B{B}_seed{s}/``
  (``checkpoint.pt`` while it trains, then ``result.json``).
"""
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ..analyses.freezing import ValleyWatch, freezing
from ..analyses.valley import (
    ValleySGD, collapse_bound, drift_rate, first_below, flat_position, theory_path, valley_dataset, valley_point,
    valley_position, valley_sharpness)
from ..training.data import load_dataset
from ..training.models import mlp
from ..training.sharpness import SharpnessTracker, fixed_subset
from ..training.trainer import SGDTrainer
from .job import Job, data_dir_option, dataset_option, option, strictly_monotone, timed
from .reports.flat_valley import write_flat_valley_report

PARTS = ("drift", "noise", "network")
DRIFT_TOLERANCE = 0.1  # measured log drift within 10 % of the theory's (docs/reproductions/flat-valley.md)
BOUND_TOLERANCE = 0.25  # measured failure boundary within 25 % of the theory's bound
RANK_THRESHOLD = 0.6  # Spearman correlation for "later" / "flatter" with lr/B in the network part
FAILED = 0.5  # the share of failed chains that marks the boundary
NOISE_RECORD_EVERY = 5  # the noise sweep's times to flat are short: record finely


@dataclass
class FlatValleyConfig:
    parts: tuple = option(PARTS, "parts to run: drift, noise, network")
    seed: int = option(0, "seed of the valley samples, the chains and the networks", minimum=0)
    # the valley model
    samples: int = option(1000, "samples (a_i, b_i) of the valley model")
    b_spread: float = option(1.0, "spread of the b_i around the valley b* = 1")
    a_spread: float = option(0.3, "log-normal spread of the curvatures a_i (mean 1)", minimum=0)
    chains: int = option(2000, "SGD chains per setting")
    start_sharpness: float = option(4.0, "the start's sharpness in units of the flattest point's")
    start_offset: float = option(0.9, "both start coordinates times this (below the valley, so that GD moves)")
    lrs: tuple = option((0.025, 0.05, 0.1), "learning rates of the drift grid")
    batch_sizes: tuple = option((1, 4, 16), "batch sizes of the drift grid")
    steps: int = option(4000, "SGD steps per setting")
    record_every: int = option(20, "steps between recorded positions")
    noise_lr: float = option(0.1, "learning rate of the noise sweep")
    noise_batch_size: int = option(1, "batch size of the noise sweep")
    noise_scales: tuple = option((0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0),
                                 "factors s on every b_i - b* (batch variance times s^2)")
    flat_tolerance: float = option(0.1, "'flat': valley sharpness within this fraction of the flattest")
    # the network
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    train_samples: int = option(10000, "training samples (a seeded subset)")
    subset: int = option(2000, "the fixed subset lambda_1, ||H||_F and the barriers are measured on")
    hidden: int = option(100, "width of the MLP's two hidden layers")
    net_lrs: tuple = option((0.05, 0.1, 0.2), "learning rates of the network grid")
    net_batch_sizes: tuple = option((25, 100), "batch sizes of the network grid")
    net_seeds: tuple = option((0, 1), "seeds per network setting", minimum=0)
    epochs: int = option(15, "epochs per network run")
    snapshots_per_epoch: int = option(2, "snapshots (lambda_1, barriers) per epoch")
    loss_every: int = option(10, "steps between the recorded losses inside an interval")
    barrier_threshold: float = option(0.02, "escape: a trajectory barrier above this fraction of the initial loss ...")
    sharpness_drop: float = option(0.1, "... and lambda_1 falling by at least this fraction over the interval",
                                   minimum=0)
    quick: bool = option(False, "a short run (the embedded digits, fewer chains and settings)")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.chains, c.lrs, c.batch_sizes, c.steps = 500, (0.05, 0.1), (1, 4), 1500
            c.noise_scales = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
            c.dataset, c.train_samples, c.subset, c.hidden = "digits", 1200, 500, 32
            c.net_lrs, c.net_batch_sizes, c.net_seeds, c.epochs = (0.05, 0.2), (25,), (0,), 6
        bad = [p for p in c.parts if p not in PARTS]
        if bad or not c.parts:
            raise ValueError(f"parts must be a non-empty list of {PARTS}, got {c.parts}")
        if not c.start_sharpness > 1:
            raise ValueError(f"start_sharpness must exceed 1 (the flattest point), got {c.start_sharpness}")
        if not 0 < c.start_offset <= 1:
            raise ValueError(f"start_offset must be in (0, 1], got {c.start_offset}")
        if c.steps % c.record_every or c.steps % NOISE_RECORD_EVERY:
            raise ValueError(f"steps ({c.steps}) must be a multiple of record_every ({c.record_every}) and of "
                             f"{NOISE_RECORD_EVERY}")
        if not c.sharpness_drop < 1:
            raise ValueError(f"sharpness_drop must be below 1, got {c.sharpness_drop}")
        return c


# ----------------------------------------------------------------------------- the valley model
def valley_setup(cfg):
    data = valley_dataset(cfg.samples, valley=1.0, b_spread=cfg.b_spread, a_spread=cfg.a_spread, seed=cfg.seed)
    return data, valley_point(data, cfg.start_sharpness * data.min_sharpness()) * cfg.start_offset


def chain_run(cfg, data, start, lr, batch_size, seed, keep_paths=0, record_every=None):
    """One setting's chains: the mean and median |D| along the run, the first recorded step each chain
    is flat, the share that failed, the end's valley sharpness; ``keep_paths`` chains' (w1, w2) paths."""
    sim = ValleySGD(data, lr, batch_size, start, num_chains=cfg.chains, seed=seed)
    flat = flat_position(data, cfg.flat_tolerance)
    first_flat = torch.full((cfg.chains,), -1, dtype=torch.long)

    def record(s):
        D = valley_position(s.w)
        newly = (first_flat < 0) & (D.abs() <= flat)
        first_flat[newly] = s.steps
        ok = ~s.diverged
        return (float(D[ok].mean()) if bool(ok.any()) else float("nan"), float(D[ok].abs().median()) if bool(ok.any())
                else float("nan"), s.w[:keep_paths].tolist())

    rows = sim.run(cfg.steps, record_every or cfg.record_every, record)
    S = (sim.w ** 2).sum(1)
    collapsed = ~sim.diverged & (S < 1e-3 * data.min_sharpness() / data.a_mean)
    ok = ~sim.diverged & ~collapsed
    end_sharp = valley_sharpness(data, valley_position(sim.w[ok])) / data.min_sharpness()
    reached = first_flat[ok] >= 0
    return {"lr": lr, "batch_size": batch_size, "mean_position": [r[0] for r in rows],
            "median_abs_position": [r[1] for r in rows], "paths": [r[2] for r in rows] if keep_paths else None,
            "diverged": float(sim.diverged.double().mean()), "collapsed": float(collapsed.double().mean()),
            "failed": float((~ok).double().mean()),
            "end_sharpness_median": float(end_sharp.median()) if bool(ok.any()) else None,
            "flat_share": float(reached.double().mean()) if bool(ok.any()) else 0.0,
            "median_steps_to_flat": float(first_flat[ok][reached].double().median()) if bool(reached.any()) else None}


def theory_of(cfg, data, start, lr, batch_size):
    """The theory's mean valley position at the recorded steps, its steps to flat and its start rate."""
    D0 = float(valley_position(start))
    path = theory_path(data, lr, batch_size, D0, cfg.steps)
    S0 = float(valley_sharpness(data, D0)) / data.a_mean
    return {"mean_position": path[:: cfg.record_every].tolist(),
            "steps_to_flat": first_below(path, flat_position(data, cfg.flat_tolerance)),
            "start_rate": float(drift_rate(data, lr, batch_size, S0)), "variance": data.valley_variance(batch_size)}


RESOLVED = 1e-6  # the mean of D is compared while the theory's D_n >= RESOLVED D_0 (below, float64 rounding)


def log_drift(path, start, at):
    """-ln(D_at / D_0) of a mean-position path (inf if it is not positive there)."""
    return -math.log(path[at] / start) if path[at] > 0 else float("inf")


def compared_record(theory_positions, start):
    """The last record at which the theory's mean position is still above ``RESOLVED`` D_0: past it the
    chains' mean D is a sum of numbers at the rounding level of w1^2 - w2^2 and its log means nothing."""
    above = [k for k, v in enumerate(theory_positions) if v >= RESOLVED * start]
    return above[-1] if above else 0


def drift_part(cfg, ctx):
    data, start = valley_setup(cfg)
    D0 = float(valley_position(start))
    gd = chain_run(replace(cfg, chains=1), data, start, cfg.lrs[-1], None, cfg.seed, keep_paths=1)
    rows = []
    for i, lr in enumerate(cfg.lrs):
        for j, B in enumerate(cfg.batch_sizes):
            t = time.perf_counter()
            run = chain_run(cfg, data, start, lr, int(B), cfg.seed * 1000 + 10 * i + j,
                            keep_paths=8 if (i, j) == (len(cfg.lrs) // 2, len(cfg.batch_sizes) // 2) else 0)
            theory = theory_of(cfg, data, start, lr, int(B))
            at = compared_record(theory["mean_position"], D0)
            measured = log_drift(run["mean_position"], D0, at)
            predicted = log_drift(theory["mean_position"], D0, at)
            run.update({"theory": theory, "log_drift": measured, "theory_log_drift": predicted,
                        "compared_at_step": at * cfg.record_every,
                        "drift_per_step": measured / (at * cfg.record_every) if at else None,
                        "relative_error": measured / predicted - 1 if math.isfinite(measured + predicted) else None,
                        "seconds": time.perf_counter() - t})
            rows.append(run)
            ctx.log(f"drift lr {lr:g} B {B}: -ln(D/D_0) at step {at * cfg.record_every} {measured:.3f} (theory "
                    f"{predicted:.3f}), end sharpness "
                    f"{run['end_sharpness_median']:.3f} x the flattest, {run['flat_share']:.0%} of chains flat, "
                    f"{run['failed']:.1%} failed")
    gd_end = float(valley_sharpness(data, gd["mean_position"][-1])) / data.min_sharpness()
    return {"valley": data.valley, "min_sharpness": data.min_sharpness(), "start": start.tolist(),
            "start_position": D0, "start_sharpness": float(valley_sharpness(data, D0)) / data.min_sharpness(),
            "flat_position": flat_position(data, cfg.flat_tolerance), "gd": {**gd, "lr": cfg.lrs[-1],
            "end_sharpness": gd_end, "end_position": gd["mean_position"][-1]}, "rows": rows}


def noise_part(cfg, ctx):
    base, start = valley_setup(cfg)
    lr, B = cfg.noise_lr, cfg.noise_batch_size
    rows = []
    for k, scale in enumerate(cfg.noise_scales):
        data = base.with_noise_scale(scale)
        run = chain_run(cfg, data, start, lr, B, cfg.seed * 1000 + 500 + k, record_every=NOISE_RECORD_EVERY)
        theory = theory_of(cfg, data, start, lr, B)
        run.update({"scale": scale, "theory_steps_to_flat": theory["steps_to_flat"], "variance": theory["variance"]})
        for key in ("mean_position", "median_abs_position", "paths"):  # the sweep keeps only its summaries
            del run[key]
        rows.append(run)
        ctx.log(f"noise scale {scale:g}: {run['failed']:.1%} failed ({run['collapsed']:.1%} collapsed, "
                f"{run['diverged']:.1%} diverged), median steps to flat {run['median_steps_to_flat']} "
                f"(theory {theory['steps_to_flat']})")
    bound = collapse_bound(base, lr, B)
    return {"lr": lr, "batch_size": B, "rows": rows, "theory_bound": bound,
            "measured_bound": crossing([r["scale"] for r in rows], [r["failed"] for r in rows], FAILED)}


def crossing(xs, ys, level):
    """The x where ys first reaches ``level`` (log-linear interpolation between grid points), or None."""
    for k in range(1, len(xs)):
        if ys[k] >= level > ys[k - 1]:
            f = (level - ys[k - 1]) / (ys[k] - ys[k - 1])
            return math.exp(math.log(xs[k - 1]) + f * (math.log(xs[k]) - math.log(xs[k - 1])))
    return None


# ----------------------------------------------------------------------------- the network
def network_data(cfg):
    x, y = load_dataset(cfg.dataset, "train", cfg.data_dir)
    x = x.reshape(x.shape[0], -1)
    if cfg.train_samples < x.shape[0]:
        x, y = fixed_subset(x, y, cfg.train_samples, seed=cfg.seed + 1)
    return (x, y), fixed_subset(x, y, min(cfg.subset, x.shape[0]), seed=cfg.seed)


def network_run(cfg, ctx, train, subset, lr, B, seed):
    folder = ctx.path("network", f"lr{lr:g}_B{B}_seed{seed}")

    def compute():
        x, y = train
        model = mlp((x.shape[1], cfg.hidden, cfg.hidden, 10), seed=seed)
        steps_per_epoch = x.shape[0] // B + (x.shape[0] % B > 0)
        every = max(cfg.loss_every, steps_per_epoch // cfg.snapshots_per_epoch // cfg.loss_every * cfg.loss_every)
        watch = ValleyWatch(model, F.cross_entropy, subset, every=every, loss_every=cfg.loss_every, batch_size=1000)
        tracker = SharpnessTracker(model, F.cross_entropy, subset, k=1, every=every, frobenius_probes=20,
                                   alignment_batches=0, batch_size=1000, seed=seed)
        trainer = SGDTrainer(model, x, y, batch_size=B, lr=lr, seed=seed, callbacks=[watch, tracker],
                             checkpoint=os.path.join(folder, "checkpoint.pt"), checkpoint_seconds=ctx.checkpoint_seconds)
        ctx.resume_training(trainer).run(max_epochs=cfg.epochs, stopping_rule=None, progress=ctx.progress)
        watch.snapshot(trainer.step, trainer.epoch)  # the last interval, at the final weights
        final = tracker.measure(trainer)
        lam = [r["eigenvalues"][0] for r in tracker.history]
        steps = [r["step"] for r in tracker.history]
        times = [h["step"] / steps_per_epoch for h in watch.history]
        initial = watch.losses[0][1]
        fz = freezing(times, [h["trajectory"] for h in watch.history], lam, cfg.barrier_threshold * initial,
                      cfg.sharpness_drop, start=0.0)
        straight = freezing(times, [h["straight"] for h in watch.history], lam, cfg.barrier_threshold * initial,
                            cfg.sharpness_drop, start=0.0)
        return {"lr": lr, "batch_size": B, "seed": seed, "noise": lr / B, "epochs": cfg.epochs,
                "steps_per_epoch": steps_per_epoch, "every": every, "initial_loss": initial,
                "snapshot_epochs": [s / steps_per_epoch for s in steps], "lambda1": lam,
                "frobenius": [r.get("frobenius") for r in tracker.history], "intervals": watch.history,
                "losses": watch.losses, "freezing": fz.to_dict(), "straight_path_freezing": straight.to_dict(),
                "final_lambda1": final["eigenvalues"][0], "final_loss": trainer.history[-1]["full_loss"],
                "final_accuracy": trainer.history[-1]["full_accuracy"]}

    result = ctx.reuse(os.path.join(folder, "result.json"), compute, label=folder)
    checkpoint = os.path.join(folder, "checkpoint.pt")
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)
    ctx.log(f"network lr {lr:g} B {B} seed {seed}: {result['freezing']['count']} escapes, freezing at epoch "
            f"{result['freezing']['time']:.2f}, final lambda_1 {result['final_lambda1']:.3g}")
    return result


def network_part(cfg, ctx):
    train, subset = network_data(cfg)
    ctx.log(f"{cfg.dataset}: {train[0].shape[0]} training samples, MLP in-{cfg.hidden}-{cfg.hidden}-10, "
            f"{cfg.epochs} epochs, lr {list(cfg.net_lrs)} x B {list(cfg.net_batch_sizes)} x seeds {list(cfg.net_seeds)}")
    runs = [network_run(cfg, ctx, train, subset, lr, int(B), int(seed))
            for lr in cfg.net_lrs for B in cfg.net_batch_sizes for seed in cfg.net_seeds]
    settings = {}
    for r in runs:
        settings.setdefault((r["lr"], r["batch_size"]), []).append(r)
    table = [{"lr": lr, "batch_size": B, "noise": lr / B, "runs": len(rs),
              "escapes": float(np.mean([r["freezing"]["count"] for r in rs])),
              "freezing_epoch": float(np.mean([r["freezing"]["time"] for r in rs])),
              "early_share": float(np.nanmean([r["freezing"]["early_share"] for r in rs]))
              if any(r["freezing"]["count"] for r in rs) else None,
              "straight_escapes": float(np.mean([r["straight_path_freezing"]["count"] for r in rs])),
              "final_lambda1": float(np.mean([r["final_lambda1"] for r in rs])),
              "final_loss": float(np.mean([r["final_loss"] for r in rs]))}
             for (lr, B), rs in sorted(settings.items(), key=lambda kv: kv[0][0] / kv[0][1])]
    return {"runs": runs, "settings": table}


# ----------------------------------------------------------------------------- the job
class FlatValleyJob(Job):
    """SGD's effective regularisation toward flat solutions on a degenerate valley, and transient freezing in
    a network (Yang, Tang & Tu 2023; Yang et al. 2026)"""

    name, config, report = "flat-valley", FlatValleyConfig, write_flat_valley_report

    def compute(self, cfg, ctx):
        parts = ctx.stages("parts.json")
        for name, fn in (("drift", drift_part), ("noise", noise_part), ("network", network_part)):
            if name in cfg.parts:
                parts.run(name, timed(lambda: fn(cfg, ctx)))
        results = dict(parts)
        return {**results, "checks": checks(results),
                "seconds": max(ctx.elapsed(), sum(v["seconds"] for v in results.values()))}

    def headline(self, s):
        return f"{sum(c['holds'] for c in s['checks'])} of {len(s['checks'])} claims hold"


JOB = FlatValleyJob()
run = JOB.run


def checks(results):
    out = []
    if "drift" in results:
        d = results["drift"]
        rows = d["rows"]
        sgd = [r["end_sharpness_median"] for r in rows]
        out.append({"claim": "SGD ends flatter than GD on the valley (median end sharpness, every lr and B)",
                    "values": {"GD": d["gd"]["end_sharpness"], "SGD, largest": max(sgd), "SGD, smallest": min(sgd)},
                    "holds": max(sgd) < d["gd"]["end_sharpness"]})
        lrs = sorted({r["lr"] for r in rows})
        Bs = sorted({r["batch_size"] for r in rows})
        grid = {(r["lr"], r["batch_size"]): r["drift_per_step"] for r in rows}
        along_lr = all(strictly_monotone([grid[(lr, B)] for lr in lrs]) for B in Bs)
        along_B = all(strictly_monotone([grid[(lr, B)] for B in Bs], increasing=False) for lr in lrs)
        out.append({"claim": "the effective regularisation grows with lr and with the batch-to-batch variance (the "
                             "drift per step toward the flat point rises with lr at every B and falls with B at every "
                             "lr)",
                    "values": {f"lr {lr:g}": [grid[(lr, B)] for B in Bs] for lr in lrs}, "holds": along_lr and along_B})
        errors = [r["relative_error"] for r in rows]
        out.append({"claim": f"the drift along the valley is the effective loss's (with its discrete-step factor) "
                             f"within {DRIFT_TOLERANCE:.0%} at every lr and B",
                    "values": {"largest |error|": max(abs(e) for e in errors if e is not None) if any(
                        e is not None for e in errors) else None},
                    "holds": all(e is not None and abs(e) <= DRIFT_TOLERANCE for e in errors)})
    if "noise" in results:
        n = results["noise"]
        ok = [r for r in n["rows"] if r["failed"] < FAILED and r["median_steps_to_flat"] is not None]
        times = [r["median_steps_to_flat"] for r in ok]
        out.append({"claim": "stronger noise reaches the flat solutions faster, below the bound (median steps to flat "
                             "falls with the noise scale wherever most chains survive)",
                    "values": {"scales": [r["scale"] for r in ok], "steps": times},
                    "holds": len(times) >= 3 and strictly_monotone(times, increasing=False)})
        m, t = n["measured_bound"], n["theory_bound"]
        out.append({"claim": f"beyond a noise bound training fails; the measured bound (half the chains failed) is the "
                             f"theory's within {BOUND_TOLERANCE:.0%}",
                    "values": {"measured": m, "theory": t},
                    "holds": m is not None and t is not None and abs(m / t - 1) <= BOUND_TOLERANCE})
    if "network" in results:
        table = results["network"]["settings"]
        runs = results["network"]["runs"]
        noise = [s["noise"] for s in table]
        early = [r for r in runs if r["freezing"]["count"] > 0 and r["freezing"]["early_share"] >= 0.5
                 and r["freezing"]["time"] < 0.75 * r["epochs"]]
        out.append({"claim": "the network escapes sharp regions early and then freezes (every run: escapes, most in "
                             "the first half, the last before 3/4 of training)",
                    "values": {"runs that do": len(early), "runs": len(runs)}, "holds": len(early) == len(runs)})
        rho_t = _spearman(noise, [s["freezing_epoch"] for s in table])
        out.append({"claim": f"more noise freezes later (Spearman of lr/B with the freezing epoch ≥ {RANK_THRESHOLD})",
                    "values": {"Spearman": rho_t, "freezing epochs": [s["freezing_epoch"] for s in table]},
                    "holds": rho_t is not None and rho_t >= RANK_THRESHOLD})
        rho_l = _spearman(noise, [s["final_lambda1"] for s in table])
        out.append({"claim": f"more noise ends flatter (Spearman of lr/B with the final λ_1 ≤ −{RANK_THRESHOLD})",
                    "values": {"Spearman": rho_l, "final λ_1": [s["final_lambda1"] for s in table]},
                    "holds": rho_l is not None and rho_l <= -RANK_THRESHOLD})
    return out


def _spearman(x, y):
    if len(x) < 3 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)
