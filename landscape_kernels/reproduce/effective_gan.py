"""``landscape-kernels reproduce effective-gan``: the effective particle model of GAN training (Durr,
Mroueh, Tu & Wang, PRX 2023, arXiv 2212.04580): a mode-collapse transition and critical damping;
``docs/reproductions/effective-gan.md``.

Three parts, each kept in ``OUT/parts.json`` as it finishes (``--resume`` reuses them):

- ``phases``: N particles against N target images (MNIST, the paper's data), every (discriminator
  learning rate, φ = g2/g1) of a grid advanced together as one batch; the diversity score over time and
  at the end, and the φ at which it crosses half of log N (the mode-collapse transition) for every
  learning rate;
- ``discriminator``: the same grid against other discriminators (activation and width), and how their
  transition lines differ from the first one's, read against the frequency principle;
- ``damping``: a particle cloud in a few dimensions against a target cloud, the R1 gradient penalty
  swept; the centre of mass's convergence time and a damped-oscillator fit of its path for each penalty.

The final particles of the phase diagrams are kept in ``OUT/particles_<part>.pt`` for the report's
images.
"""
import math
import os
from dataclasses import dataclass, replace

import torch

from ..analyses.effective_gan import (
    ACTIVATIONS, DISC_OPTIMIZERS, ParticleGAN, convergence_step, covered_targets, diversity_score,
    mean_nearest_distance, oscillator_fit)
from ..training.data import load_dataset
from ..training.progress import Progress
from ..training.state_files import load_state, save_state
from .job import Job, data_dir_option, dataset_option, option, strictly_monotone, timed
from .reports.effective_gan import write_effective_gan_report

PARTS = ("phases", "discriminator", "damping")
COLLAPSE_LEVEL = 0.5  # the transition: the diversity score crosses this fraction of log N
SHIFT_FACTOR = 1.5  # "the transition moves": φ_c differs by at least this factor (or leaves the grid)
DAMPING_START = 0.5  # the oscillator is fitted from where the centre's distance first falls below this share


@dataclass
class EffectiveGanConfig:
    parts: tuple = option(PARTS, "parts to run: phases, discriminator, damping")
    seed: int = option(0, "seed of the particles' start and of the discriminators' initial weights", minimum=0)
    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    targets: int = option(100, "target images (the first of the training set) and as many particles")
    init_scale: float = option(0.1, "std of the particles' Gaussian start (standardised pixel units)")
    particle_lr: float = option(0.1, "the particles' learning rate lr_x (the kernel's g1 = 1)")
    disc_lrs: tuple = option((1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3), "discriminator learning rates of the grid")
    phis: tuple = option((0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.9), "φ = g2/g1 of the grid (each in [0, 1))",
                         minimum=0)
    steps: int = option(1000, "steps T of each phase-diagram setting")
    record_every: int = option(50, "steps between recorded diversity scores")
    hidden: int = option(128, "width of the discriminator's hidden layer")
    activation: str = option("relu", "the discriminator's activation", choices=tuple(ACTIVATIONS))
    variants: tuple = option(("tanh-128", "sin-128"), "discriminators of the discriminator part, ACTIVATION-WIDTH",
                             type=str)
    weight_decay: float = option(1e-4, "the discriminator's weight decay", minimum=0)
    disc_optimizer: str = option("adam", "the discriminator's optimiser (the particles always take plain steps)",
                                 choices=DISC_OPTIMIZERS)
    # critical damping
    damping_dim: int = option(2, "dimension of the damping part's particle and target clouds")
    damping_offset: float = option(2.0, "distance between the two clouds' centres (per coordinate)")
    damping_spread: float = option(0.5, "std of both clouds")
    damping_phi: float = option(0.0, "φ of the damping part", minimum=0)
    damping_disc_lr: float = option(0.03, "the damping part's discriminator learning rate (plain gradient steps)")
    damping_particle_lr: float = option(0.1, "the damping part's particle learning rate")
    damping_hidden: int = option(64, "width of the damping part's discriminator")
    penalties: tuple = option((0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "R1 gradient-penalty strengths γ",
                              minimum=0)
    damping_steps: int = option(3000, "steps of each damping run")
    tolerance: float = option(0.05, "converged: the centre's distance stays below this share of its start")
    quick: bool = option(False, "a short run (the embedded digits, a smaller grid and discriminator)")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.hidden, c.steps, c.record_every = "digits", 32, 200, 25
            c.disc_lrs, c.phis, c.variants = (1e-4, 1e-3), (0.0, 0.01, 0.1, 0.9), ("tanh-32",)
            c.penalties, c.damping_steps, c.damping_hidden = (0.0, 0.3, 1.0, 3.0, 10.0), 1000, 32
        bad = [p for p in c.parts if p not in PARTS]
        if bad or not c.parts:
            raise ValueError(f"parts must be a non-empty list of {PARTS}, got {c.parts}")
        if "discriminator" in c.parts and "phases" not in c.parts:
            raise ValueError("the discriminator part compares with the phases part's transition: run both "
                             "(--parts phases,discriminator)")
        if not c.phis or any(not 0 <= p < 1 for p in c.phis) or list(c.phis) != sorted(set(c.phis)):
            raise ValueError(f"phis must be increasing values in [0, 1), got {c.phis}")
        if not 0 <= c.damping_phi < 1:
            raise ValueError(f"damping_phi must be in [0, 1), got {c.damping_phi}")
        if list(c.disc_lrs) != sorted(set(c.disc_lrs)):
            raise ValueError(f"disc_lrs must be increasing, got {c.disc_lrs}")
        if list(c.penalties) != sorted(set(c.penalties)) or len(c.penalties) < 3:
            raise ValueError(f"penalties must be at least 3 increasing values, got {c.penalties}")
        if c.steps % c.record_every:
            raise ValueError(f"steps ({c.steps}) must be a multiple of record_every ({c.record_every})")
        if c.targets < 2:
            raise ValueError(f"targets must be at least 2, got {c.targets}")
        if not c.tolerance < 1:
            raise ValueError(f"tolerance must be below 1, got {c.tolerance}")
        for v in c.variants:
            parse_variant(v)
        return c


def parse_variant(text):
    """'tanh-128' -> ('tanh', 128), with a clear error naming --variants."""
    activation, _, width = text.partition("-")
    if activation not in ACTIVATIONS or not width.isdigit() or int(width) < 1:
        raise ValueError(f"every value of variants (--variants) must be ACTIVATION-WIDTH with ACTIVATION one of "
                         f"{sorted(ACTIVATIONS)} and WIDTH a positive integer, got {text!r}")
    return activation, int(width)


# ----------------------------------------------------------------------------- data
def target_images(cfg):
    """The first ``cfg.targets`` training images, flattened and standardised by the whole training set's
    pixel mean and std (for MNIST the usual 0.1307 and 0.3081)."""
    x, _ = load_dataset(cfg.dataset, "train", cfg.data_dir)
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    if cfg.targets > x.shape[0]:
        raise ValueError(f"targets (--targets) is {cfg.targets}, but {cfg.dataset} has {x.shape[0]} training images")
    mean, std = float(x.mean()), float(x.std())
    return (x[: cfg.targets] - mean) / std, {"mean": mean, "std": std, "side": int(round(math.sqrt(x.shape[1])))}


def start_particles(cfg, count, dim, scale):
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(count, dim, generator=g) * scale


# ----------------------------------------------------------------------------- phase diagram
def transition(phis, scores, level):
    """The φ at which ``scores`` (one per φ, increasing φ) first reach ``level``: interpolated between
    the grid points around the crossing (in log φ, linearly from φ = 0). ``"below grid"`` when the
    first φ already reaches it, ``"above grid"`` when none does."""
    for k, s in enumerate(scores):
        if s is not None and s >= level:
            if k == 0:
                return "below grid"
            lo, hi, s0 = phis[k - 1], phis[k], scores[k - 1]
            f = (level - s0) / (s - s0)
            if lo > 0:
                return math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo)))
            return lo + f * (hi - lo)
    return "above grid"


def grid_run(cfg, ctx, targets, activation, hidden, label):
    """Every (lr_D, φ) of the grid as one batch for ``cfg.steps`` steps; the recorded scores, the
    transition per lr_D, and the final particles (kept in OUT/particles_<label>.pt)."""
    lrs, phis = list(cfg.disc_lrs), list(cfg.phis)
    lr_of = torch.tensor([lr for lr in lrs for _ in phis])
    phi_of = torch.tensor([phi for _ in lrs for phi in phis])
    x0 = start_particles(cfg, targets.shape[0], targets.shape[1], cfg.init_scale)
    gan = ParticleGAN(x0, targets, phi_of, lr_of, cfg.particle_lr, hidden=(hidden,), activation=activation,
                      weight_decay=cfg.weight_decay, disc_optimizer=cfg.disc_optimizer, seed=cfg.seed)
    records = {k: [] for k in ("step", "diversity", "diversity_targets", "nearest_distance", "covered", "disc_loss")}
    bar = Progress(cfg.steps, desc=f"{label} ({activation}-{hidden}, {gan.num_settings} settings)", unit="step") \
        if ctx.progress else None

    def record(loss):
        finite = torch.isfinite(gan.x).flatten(1).all(1)
        x = torch.where(finite[:, None, None], gan.x, torch.zeros_like(gan.x))
        nan = torch.full((gan.num_settings,), float("nan"), dtype=torch.float64)
        records["step"].append(gan.steps)
        records["diversity"].append(torch.where(finite, diversity_score(x, targets, "particles"), nan).tolist())
        records["diversity_targets"].append(torch.where(finite, diversity_score(x, targets, "targets"), nan).tolist())
        records["nearest_distance"].append(torch.where(finite, mean_nearest_distance(x, targets).double(), nan).tolist())
        records["covered"].append(covered_targets(x, targets).tolist())
        records["disc_loss"].append(loss.tolist())

    record(torch.full((gan.num_settings,), float("nan")))
    for _ in range(cfg.steps):
        loss = gan.step()
        if gan.steps % cfg.record_every == 0:
            record(loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    save_state({"particles": gan.x.reshape(len(lrs), len(phis), *gan.x.shape[1:]).clone(), "targets": targets},
               ctx.path(f"particles_{label}.pt"))
    level = COLLAPSE_LEVEL * math.log(targets.shape[0])
    final = [[_number(records["diversity"][-1][i * len(phis) + j]) for j in range(len(phis))] for i in range(len(lrs))]
    diverged = sum(v is None for row in final for v in row)
    transitions = [transition(phis, row, level) for row in final]
    for lr, row, t in zip(lrs, final, transitions):
        ctx.log(f"{label} {activation}-{hidden} lr_D {lr:g}: diversity at T " + " ".join(
            "nan" if v is None else f"{v:.2f}" for v in row) + f"; transition φ_c {_shown(t)}")

    def grid(key, k=-1):
        return [[_number(records[key][k][i * len(phis) + j]) for j in range(len(phis))] for i in range(len(lrs))]

    return {"activation": activation, "hidden": hidden, "disc_lrs": lrs, "phis": phis, "level": level,
            "final_diversity": final, "final_diversity_targets": grid("diversity_targets"),
            "final_nearest_distance": grid("nearest_distance"), "final_covered": grid("covered"),
            "transitions": transitions, "diverged": diverged, "records": records}


def _number(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _shown(t):
    return t if isinstance(t, str) else f"{t:.3g}"


def phases_part(cfg, ctx):
    targets, scale = target_images(cfg)
    ctx.log(f"{cfg.dataset}: {targets.shape[0]} targets in {targets.shape[1]} dimensions; {len(cfg.disc_lrs)} lr_D x "
            f"{len(cfg.phis)} φ, T = {cfg.steps}")
    return {**grid_run(cfg, ctx, targets, cfg.activation, cfg.hidden, "phases"), "pixels": scale}


def discriminator_part(cfg, ctx):
    targets, _ = target_images(cfg)
    runs = []
    for k, text in enumerate(cfg.variants):
        activation, hidden = parse_variant(text)
        runs.append(grid_run(cfg, ctx, targets, activation, hidden, f"discriminator{k}"))
    return {"variants": runs}


# ----------------------------------------------------------------------------- critical damping
def damping_part(cfg, ctx):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n, d = cfg.targets, cfg.damping_dim
    targets = torch.randn(n, d, generator=g) * cfg.damping_spread + cfg.damping_offset
    x0 = torch.randn(n, d, generator=g) * cfg.damping_spread
    gan = ParticleGAN(x0, targets, cfg.damping_phi, cfg.damping_disc_lr, cfg.damping_particle_lr,
                      hidden=(cfg.damping_hidden,), activation=cfg.activation, weight_decay=cfg.weight_decay,
                      penalty=torch.tensor(cfg.penalties), disc_optimizer="sgd", seed=cfg.seed)
    centre = targets.mean(0)
    direction = x0.mean(0) - centre
    direction = direction / direction.norm()
    distance, along = [], []
    bar = Progress(cfg.damping_steps, desc=f"damping ({len(cfg.penalties)} penalties)", unit="step") \
        if ctx.progress else None
    for _ in range(cfg.damping_steps + 1):
        offset = gan.x.mean(1) - centre  # (S, d)
        distance.append(offset.norm(dim=-1).double())
        along.append((offset @ direction).double())
        if gan.steps < cfg.damping_steps:
            gan.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    distance, along = torch.stack(distance, 1), torch.stack(along, 1)  # (S, steps + 1)
    rows = []
    for s, penalty in enumerate(cfg.penalties):
        dist = distance[s]
        finite = bool(torch.isfinite(dist).all())
        steps = convergence_step(dist, cfg.tolerance) if finite else None
        below = (dist < DAMPING_START * dist[0]).nonzero() if finite else []
        start = int(below[0]) if len(below) else None
        fit = oscillator_fit(along[s, start:]) if start is not None else None
        rows.append({"penalty": penalty, "convergence_step": steps, "fit_from": start, "fit": fit,
                     "final_distance": float(dist[-1] / dist[0]) if finite else None,
                     "distance": dist[:: max(1, cfg.damping_steps // 300)].tolist(),
                     "along": along[s, :: max(1, cfg.damping_steps // 300)].tolist()})
        ctx.log(f"damping γ {penalty:g}: converged at step {steps}, damping ratio "
                f"{'-' if fit is None else format(fit['damping_ratio'], '.3f')}")
    return {"dim": d, "phi": cfg.damping_phi, "disc_lr": cfg.damping_disc_lr, "particle_lr": cfg.damping_particle_lr,
            "record_stride": max(1, cfg.damping_steps // 300), "rows": rows}


# ----------------------------------------------------------------------------- the job
class EffectiveGanJob(Job):
    """The effective particle model of GAN training: a mode-collapse transition in (lr_D, g2/g1), its
    dependence on the discriminator, and critical damping by a gradient penalty (Durr, Mroueh, Tu & Wang 2023)"""

    name, config, report = "effective-gan", EffectiveGanConfig, write_effective_gan_report
    trains = False

    def compute(self, cfg, ctx):
        parts = ctx.stages("parts.json")
        for name, fn in (("phases", phases_part), ("discriminator", discriminator_part), ("damping", damping_part)):
            if name in cfg.parts:
                parts.run(name, timed(lambda: fn(cfg, ctx)))
        results = dict(parts)
        arrays = {}
        for label in ["phases"] + [f"discriminator{k}" for k in range(len(cfg.variants))]:
            path = ctx.path(f"particles_{label}.pt")
            if os.path.isfile(path):
                arrays[label] = load_state(path, "reproduce effective-gan")
        summary = {**results, "checks": checks(results),
                   "seconds": max(ctx.elapsed(), sum(v["seconds"] for v in results.values()))}
        return summary, arrays

    def headline(self, s):
        return f"{sum(c['holds'] for c in s['checks'])} of {len(s['checks'])} claims hold"


JOB = EffectiveGanJob()
run = JOB.run


def _log_phi(t, phis):
    """A transition as a number for comparisons: off-grid ends as one grid step beyond the grid."""
    positive = [p for p in phis if p > 0]
    if t == "below grid":
        return math.log(positive[0]) - 1
    if t == "above grid":
        return math.log(max(positive)) + 1
    return math.log(max(t, positive[0] / 10))


def checks(results):
    out = []
    if "phases" in results:
        p = results["phases"]
        inside = [t for t in p["transitions"] if not isinstance(t, str)]
        out.append({"claim": f"a mode-collapse transition: at most discriminator learning rates the diversity score "
                             f"rises from below to above {COLLAPSE_LEVEL:g} log N within the φ grid",
                    "values": {f"lr_D {lr:g}": _shown(t) for lr, t in zip(p["disc_lrs"], p["transitions"])},
                    "holds": len(inside) > len(p["transitions"]) / 2})
    if "discriminator" in results and "phases" in results:
        base = results["phases"]
        phis = base["phis"]
        for v in results["discriminator"]["variants"]:
            moved = [abs(_log_phi(a, phis) - _log_phi(b, phis)) >= math.log(SHIFT_FACTOR)
                     for a, b in zip(base["transitions"], v["transitions"])]
            out.append({"claim": f"the transition depends on the discriminator: {v['activation']}-{v['hidden']}'s φ_c "
                                 f"differs from {base['activation']}-{base['hidden']}'s by a factor ≥ {SHIFT_FACTOR:g} "
                                 f"at at least half the learning rates",
                        "values": {f"lr_D {lr:g}": f"{_shown(a)} vs {_shown(b)}" for lr, a, b in
                                   zip(base["disc_lrs"], base["transitions"], v["transitions"])},
                        "holds": sum(moved) >= len(moved) / 2})
        order = {"tanh": 0, "relu": 1, "sin": 2}  # low- to high-frequency capacity (docs page)
        ranked = sorted((r for r in [base] + results["discriminator"]["variants"] if r["activation"] in order),
                        key=lambda r: order[r["activation"]])
        if len({r["activation"] for r in ranked}) == len(ranked) >= 2:
            means = [sum(_log_phi(t, phis) for t in r["transitions"]) / len(r["transitions"]) for r in ranked]
            out.append({"claim": "frequency principle: the more a discriminator can resolve high frequencies "
                                 "(tanh < relu < sin), the later its particles collapse (the geometric mean of φ_c "
                                 "over the learning rates rises along that order)",
                        "values": {f"{r['activation']}-{r['hidden']}": math.exp(m) for r, m in zip(ranked, means)},
                        "holds": strictly_monotone(means)})
    if "damping" in results:
        rows = results["damping"]["rows"]
        times = [r["convergence_step"] for r in rows]
        done = [(t, k) for k, t in enumerate(times) if t is not None]
        best = min(done)[1] if done else None
        out.append({"claim": "an intermediate gradient penalty converges fastest (the shortest convergence time is "
                             "at neither end of the γ sweep)",
                    "values": {f"γ {r['penalty']:g}": r["convergence_step"] for r in rows},
                    "holds": best is not None and 0 < best < len(rows) - 1})
        zetas = [r["fit"]["damping_ratio"] if r["fit"] else None for r in rows]
        crossing = [k for k in range(1, len(rows)) if zetas[k - 1] is not None and zetas[k] is not None
                    and zetas[k - 1] < 1 <= zetas[k]]
        out.append({"claim": "critical damping: without penalty the centre of mass oscillates (damping ratio ζ < 1), "
                             "and ζ crosses 1 within one grid step of the fastest penalty",
                    "values": {f"γ {r['penalty']:g}": z for r, z in zip(rows, zetas)} | (
                        {"fastest γ": rows[best]["penalty"]} if best is not None else {}),
                    "holds": best is not None and zetas[0] is not None and zetas[0] < 1 and bool(crossing)
                    and any(best in (k - 1, k) for k in crossing)})
    return out
