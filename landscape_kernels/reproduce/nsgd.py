"""``landscape-kernels reproduce nsgd``: Nudged SGD (Jastrzębski et al., ICLR 2019);
``docs/reproductions/sharpest-directions.md``.

NSGD with each gamma (1 is plain SGD) from one initialisation and one minibatch order; the top-K
subspace E is refreshed by a ``SharpnessTracker`` at the start of every epoch, which also logs lambda_1
and ||H||_F. The report compares training speed (full training loss per epoch), the final lambda_1 and
||H||_F, and test accuracy: the paper finds gamma < 1 trains faster and ends sharper and generalises
as well or better, gamma > 1 flatter but worse.
"""
import time
from dataclasses import dataclass, replace

from .job import Job, option
from .reports.sharpness import write_nsgd_report
from .tracked import TrackedConfig, load_data, train_tracked


@dataclass
class NSGDConfig(TrackedConfig):
    epochs: int = option(10, "epochs per gamma")
    lr: float = option(0.01, "SGD learning rate")
    batch_size: int = option(128, "SGD batch size B")
    gammas: tuple = option((0.01, 0.1, 1.0, 5.0), "the step along the top-K subspace is scaled by gamma (1 is SGD)")

    def resolved(self):
        c = replace(self)
        if c.quick:
            c.dataset, c.model, c.gammas, c.epochs, c.subset, c.k, c.lr = "digits", "mlp", (0.1, 1.0, 5.0), 3, 256, 3, 0.1
        if 1.0 not in [float(g) for g in c.gammas]:
            raise ValueError(f"gammas must include 1 (plain SGD, the baseline), got {c.gammas}")
        if c.frobenius_probes < 1:
            raise ValueError(f"frobenius_probes must be >= 1 for nsgd (its claims compare ||H||_F), got {c.frobenius_probes}")
        return c


class NSGDJob(Job):
    """Nudged SGD over gamma: training speed, sharpness, generalisation (Jastrzebski et al., ICLR 2019)"""

    name, config, report = "nsgd", NSGDConfig, write_nsgd_report
    docs = "sharpest-directions"

    def compute(self, cfg, ctx):
        log = ctx.log
        train, test, subset = load_data(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.subset, cfg.seed)
        log(f"{cfg.dataset}: {train[0].shape[0]} training samples, Hessian subset {subset[0].shape[0]}, model "
            f"{cfg.model}; lr {cfg.lr}, B {cfg.batch_size}, K {cfg.k}")
        runs = {}
        for gamma in cfg.gammas:
            name = f"gamma{float(gamma):g}"
            t = time.perf_counter()
            runs[name] = r = train_tracked(ctx, ctx.path(name), train, test, subset, model_name=cfg.model,
                                           batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, k=cfg.k,
                                           every=None, seed=cfg.seed, tol=cfg.tol, gamma=float(gamma),
                                           frobenius_probes=cfg.frobenius_probes)
            log(f"gamma {gamma:g}: final full loss {r['training'][-1]['full_loss']:.4g}, lambda_1 "
                f"{r['final_lambda1']:.4g}, ||H||_F {r['final_frobenius']:.4g}, test accuracy {r['test_accuracy']:.4f} "
                f"({time.perf_counter() - t:.0f} s)")
        return {"runs": runs, "checks": checks(runs)}

    def headline(self, s):
        return "final lambda_1 " + ", ".join(f"gamma {r['gamma']:g} {r['final_lambda1']:.3g}" for r in s["runs"].values())


JOB = NSGDJob()
run = JOB.run


def checks(runs):
    """The paper's findings on NSGD, each against the gamma = 1 (SGD) run."""
    base = next(r for r in runs.values() if r["gamma"] == 1.0)
    small = [r for r in runs.values() if r["gamma"] < 1]
    large = [r for r in runs.values() if r["gamma"] > 1]

    def mean_loss(r):  # the area under the full-loss curve per epoch: lower is faster training
        return sum(t["full_loss"] for t in r["training"]) / len(r["training"])

    out = []
    if small:
        out.append({"claim": "γ < 1 trains faster (full training loss averaged over the epochs, below SGD's)",
                    "values": {f"γ {r['gamma']:g}": mean_loss(r) for r in small + [base]},
                    "holds": all(mean_loss(r) < mean_loss(base) for r in small)})
        out.append({"claim": "γ < 1 ends sharper (final λ_1 and ||H||_F above SGD's)",
                    "values": {f"γ {r['gamma']:g}": r["final_lambda1"] for r in small + [base]},
                    "holds": all(r["final_lambda1"] > base["final_lambda1"] and r["final_frobenius"] > base["final_frobenius"]
                                 for r in small)})
        out.append({"claim": "γ < 1 generalises as well or better (test accuracy within 0.5 % of SGD's or above)",
                    "values": {f"γ {r['gamma']:g}": r["test_accuracy"] for r in small + [base]},
                    "holds": all(r["test_accuracy"] >= base["test_accuracy"] - 0.005 for r in small)})
    if large:
        out.append({"claim": "γ > 1 ends flatter (final λ_1 below SGD's) and generalises worse",
                    "values": {f"γ {r['gamma']:g}": [r["final_lambda1"], r["test_accuracy"]] for r in large + [base]},
                    "holds": all(r["final_lambda1"] < base["final_lambda1"] and r["test_accuracy"] < base["test_accuracy"]
                                 for r in large)})
    return out
