"""The curvature stages of ``analyse``: top eigenpairs of the Hessian and the GGN, the spectral density
with its share of negative curvature, the trace and Frobenius norm, and the top eigenvalue per layer.

Each stage returns (result dict for summary.json, arrays kept beside it); every number carries its
uncertainty: true residuals for eigenvalues, standard errors over probes for the randomised estimates."""
import math

import numpy as np

from ...linalg.density import spectral_density
from ...linalg.lanczos import lanczos_eigs
from ...linalg.traces import frobenius_norm, hutchpp_trace
from .problem import parameter_groups


def top_eigenpairs(problem, op, label):
    """Lanczos top-k of ``op`` with true residuals; (result, {label_eigenvectors: (k, P)})."""
    s = problem.settings
    k = min(s.top_k, op.shape[0])
    with problem.bar(20 * k + 2 * k, label) as bar:
        r = lanczos_eigs(problem.tracked(op, bar), k=k, tol=s.tol, seed=s.seed)
    scale = max(float(r.eigenvalues.abs().max()), 1e-300)
    result = {"eigenvalues": r.eigenvalues.tolist(), "residuals": r.residuals.tolist(),
              "relative_residuals": (r.residuals / scale).tolist(), "converged": bool(r.converged),
              "num_products": r.num_products}
    return result, {f"{label}_eigenvectors": r.eigenvectors.T.detach().double().cpu().numpy()}


def hessian_stage(problem, results, arrays):
    return top_eigenpairs(problem, problem.hessian(), "hessian")


def ggn_stage(problem, results, arrays):
    return top_eigenpairs(problem, problem.ggn(), "ggn")


def density_stage(problem, results, arrays):
    """SLQ density; per probe, the mass and the share of |lambda| at negative eigenvalues."""
    s = problem.settings
    H = problem.hessian()
    steps = min(s.density_steps, H.shape[0])
    with problem.bar(s.density_probes * steps, "density") as bar:
        d = spectral_density(problem.tracked(H, bar), num_probes=s.density_probes, num_steps=steps, seed=s.seed)
    nodes, weights = d.nodes.numpy(), d.weights.numpy()
    # the bulk near zero collapses onto a few heavy nodes whose sign is rounding: only eigenvalues below
    # -sigma (the density's resolution, 1 % of the spectral range) count as negative curvature
    below = nodes < -d.sigma
    negative = (weights * below).sum(1)
    absolute = (weights * np.abs(nodes)).sum(1)
    negative_abs = (weights * np.abs(nodes) * below).sum(1) / np.maximum(absolute, 1e-300)
    trace_per_probe = problem.num_params * (weights * nodes).sum(1)
    used = weights > 0
    result = {"probes": s.density_probes, "steps": steps, "sigma": d.sigma, "num_products": d.num_products,
              "negative_mass": _mean_se(negative), "negative_curvature_share": _mean_se(negative_abs),
              "trace_slq": _mean_se(trace_per_probe),
              "lambda_min": float(nodes[used].min()), "lambda_max": float(nodes[used].max())}
    return result, {"density_grid": d.grid.numpy(), "density": d.density.numpy(), "density_nodes": nodes,
                    "density_weights": weights}


def trace_stage(problem, results, arrays):
    """tr(H) by Hutch++ and ||H||_F by Rademacher probes, each with its standard error."""
    s = problem.settings
    H = problem.hessian()
    with problem.bar(s.trace_products + s.frobenius_probes, "trace") as bar:
        op = problem.tracked(H, bar)
        trace, trace_se = hutchpp_trace(op, num_products=s.trace_products, seed=s.seed)
        frob, frob_se = frobenius_norm(op, num_probes=s.frobenius_probes, seed=s.seed + 1)
    return {"trace": trace, "trace_stderr": trace_se, "frobenius": frob, "frobenius_stderr": frob_se,
            "trace_products": s.trace_products, "frobenius_probes": s.frobenius_probes}, {}


def layers_stage(problem, results, arrays):
    """The top eigenvalue of each layer's diagonal block of the Hessian (the other layers fixed)."""
    s = problem.settings
    groups = parameter_groups(problem.param_names)
    rows = []
    with problem.bar(len(groups), "layers", unit="layer") as bar:
        for layer, names in groups:
            H = problem.hessian(params=names)
            r = lanczos_eigs(H, k=1, tol=s.layer_tol, num_iter=min(s.layer_steps, H.shape[0]), seed=s.seed)
            lam, res = float(r.eigenvalues[0]), float(r.residuals[0])
            rows.append({"layer": layer, "params": names, "size": H.shape[0], "top_eigenvalue": lam, "residual": res,
                         "converged": bool(r.converged), "num_products": r.num_products})
            bar.update(1)
    return {"layers": rows}, {}


def _mean_se(samples):
    """[mean, standard error] over probes."""
    samples = np.asarray(samples, dtype=np.float64)
    se = float(samples.std(ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else float("nan")
    return [float(samples.mean()), se]
