"""The ``kfac`` stage of ``analyse``: how close KFAC's and EKFAC's spectra are to the exact curvature on
the user's model. It takes the parameters KFAC covers (Linear, ConvNd, transformers' Conv1D), computes
the top-k eigenvalues of the exact Hessian and GGN over them by Lanczos, and every eigenvalue of the two
approximations from their factors; it reports the ratios of the top eigenvalues, the traces, and, when
the density stage ran over the same parameters, the L1 distance between the Hessian's spectral density
and the approximation's eigenvalues smoothed the same way."""
import math
import time

import numpy as np
import torch

from ...capture.model import call_model, eval_mode, model_output
from ...linalg.lanczos import lanczos_eigs
from ...operators.ggn import GGNOperator
from ...operators.kfac import EKFACOperator, KFACOperator, kfac_parameters
from ...operators.loss_hessian import mean_loss


def _check_loss(problem, kind):
    """The analysed loss must be the mean ``kind`` KFAC assumes: compared on the first batch."""
    x, y = problem.batches[0]
    with torch.no_grad(), eval_mode(problem.model):
        out = model_output(call_model(problem.model, x), problem.output_fn)
        given, assumed = float(problem.loss_fn(out, y)), float(mean_loss(kind)(out, y))
    if not math.isclose(given, assumed, rel_tol=1e-5, abs_tol=1e-12):
        raise ValueError(f"analyse: kfac: the loss on the first batch is {given:.6g}, the mean {kind} of the same "
                         f"outputs {assumed:.6g}; set kfac_loss ('cross_entropy' or 'mse') to the loss you train with")


def _top(op, k, problem):
    return lanczos_eigs(op, k=k, tol=problem.settings.tol, seed=problem.settings.seed).eigenvalues.double().cpu()


def _smoothed(eigenvalues, grid, sigma):
    """The density of the eigenvalues on ``grid``, each a Gaussian of width sigma (the SLQ smoothing)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    out = np.zeros_like(grid)
    for chunk in np.array_split(lam, max(1, lam.size // 4096)):
        out += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / sigma) ** 2).sum(1)
    return out / (lam.size * sigma * math.sqrt(2 * math.pi))


def kfac_stage(problem, results, arrays):
    s = problem.settings
    if problem.ranks.distributed:
        raise ValueError("analyse: the kfac stage runs in one process (its factors are not combined over ranks)")
    names = kfac_parameters(problem.model, problem.param_names)
    if not names:
        raise ValueError("analyse: kfac: none of the analysed parameters is in a layer KFAC covers "
                         "(Linear, ConvNd with groups=1, transformers' Conv1D)")
    _check_loss(problem, s.kfac_loss)
    everything = names == list(problem.param_names)
    size = sum(p.numel() for n, p in zip(problem.param_names, problem.params) if n in names)
    k = min(s.top_k, size)
    if everything and "hessian" in results and len(results["hessian"]["eigenvalues"]) >= k:
        hessian_top = torch.tensor(results["hessian"]["eigenvalues"][:k], dtype=torch.float64)
    else:
        hessian_top = _top(problem.hessian(params=names), k, problem)
    ggn = GGNOperator(problem.model, problem.loss_fn, problem.batches, params=names, output_fn=problem.output_fn)
    ggn_top = _top(ggn, k, problem)
    result = {"params": names, "num_params": size, "loss": s.kfac_loss, "fisher_type": "type-2",
              "hessian_top": hessian_top.tolist(), "ggn_top": ggn_top.tolist()}
    kept, seconds = {}, 0.0
    for label in ("kfac", "ekfac"):
        t0 = time.perf_counter()  # EKFAC refits KFAC's factors: its time includes KFAC's
        if label == "kfac":
            op = kfac = KFACOperator(problem.model, problem.batches, loss=s.kfac_loss, params=names,
                                     output_fn=problem.output_fn)
        else:
            op = EKFACOperator.from_kfac(kfac)
        lam = op.eigenvalues().double().cpu()
        seconds += time.perf_counter() - t0
        top = lam[:k]
        entry = {"top": top.tolist(), "ratio_to_hessian": (top / hessian_top).tolist(),
                 "ratio_to_ggn": (top / ggn_top).tolist(), "trace": float(lam.sum()), "seconds": seconds,
                 "eigenvalue_quantiles": {q: float(torch.quantile(lam, float(q))) for q in ("0.5", "0.9", "0.99")}
                 if lam.numel() <= 16_000_000 else None}
        if everything and "trace" in results:
            entry["trace_ratio_to_hessian"] = entry["trace"] / results["trace"]["trace"]
        if everything and "density_grid" in arrays and "density" in results:
            grid, density = arrays["density_grid"], arrays["density"]
            mine = _smoothed(lam.numpy(), grid, results["density"]["sigma"])
            entry["density_l1_to_hessian"] = float(np.trapezoid(np.abs(mine - density), grid))
            kept[f"{label}_density"] = mine
        result[label] = entry
    return result, kept
