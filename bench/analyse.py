"""The curvature stage of ``analyse`` against PyHessian, and the 2-D surface against a point-by-point loop.

On the digits MLP and CNN presets (all 1,438 training samples, float32, this process):

- top-k Hessian eigenvalues: ``lanczos_eigs`` on ``HessianOperator`` (the analyse stage) against PyHessian's
  ``eigenvalues`` (power iteration with deflation), both at tol 1e-3; accuracy = max relative error against
  a tol-1e-10 Lanczos reference;
- trace: Hutch++ with 99 products against PyHessian's ``trace`` (Hutchinson) with 99 probes; the error is
  each estimate's distance from a 2,000-probe Hutchinson reference, beside its standard error;
- density: SLQ with 8 probes x 60 steps, ours (all probes in one batched product per step) against
  PyHessian's ``density`` (one probe at a time); PyHessian 0.1's density calls ``torch.eig``, removed from
  torch, and runs on a shim that answers with ``torch.linalg.eigh`` (said in the output);
- the 2-D surface (21 x 21 points over two filter-normalised directions) through the batched loss-profile
  engine against a loop that sets the weights and runs the model once per point, and the analyse surface
  stage itself (``landscape_method="auto"``: it times both ways on an eighth of the points each and
  finishes with the faster).

    python bench/analyse.py --json bench/results/analyse_cpu.json
"""
import math
import os
import platform
import sys
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import landscape_kernels as lk  # noqa: E402
from landscape_kernels.analyses.analyse.landscape import filter_normalised_directions  # noqa: E402
from landscape_kernels.analyses.analyse.problem import Problem  # noqa: E402
from landscape_kernels.training.presets import digits_cnn, digits_mlp  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402
from timing import timed  # noqa: E402
from anchors import optional, pyhessian_module, torch_eig_shim  # noqa: E402

K, TOL, PRODUCTS, PROBES, STEPS, GRID = 5, 1e-3, 99, 8, 60, 21


def curvature(model, x, y, repeats):
    H = lk.HessianOperator(model, F.cross_entropy, (x, y))
    reference = lk.lanczos_eigs(H, k=K, tol=1e-10).eigenvalues.numpy()

    def rel(vals):
        return float(np.max(np.abs(np.sort(np.asarray(vals))[::-1][:K] - reference) / np.abs(reference)))

    r, t = timed(lambda: lk.lanczos_eigs(H, k=K, tol=TOL), repeats)
    out = {"topk": {"k": K, "reference": reference.tolist(),
                    "ours": {"s": t, "max_rel_err": rel(r.eigenvalues.numpy()), "products": r.num_products}}}

    def ph_top():
        h = pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        (vals, _), t = timed(lambda: h.eigenvalues(maxIter=1000, tol=TOL, top_n=K), repeats)
        return {"s": t, "max_rel_err": rel(vals)}

    out["topk"]["pyhessian"] = optional(ph_top)
    ref_trace, ref_se = lk.hutchinson_trace(H, num_probes=2000, seed=123)
    (tr, se), t = timed(lambda: lk.hutchpp_trace(H, num_products=PRODUCTS, seed=0), repeats)
    out["trace"] = {"reference": ref_trace, "reference_stderr": ref_se,
                    "ours": {"s": t, "estimate": tr, "stderr": se, "abs_err": abs(tr - ref_trace)}}

    def ph_trace():
        h = pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        samples, t = timed(lambda: h.trace(maxIter=PRODUCTS, tol=0.0), repeats)
        est = float(np.mean(samples))
        return {"s": t, "estimate": est, "stderr": float(np.std(samples, ddof=1) / math.sqrt(len(samples))),
                "abs_err": abs(est - ref_trace)}

    out["trace"]["pyhessian"] = optional(ph_trace)
    _, t = timed(lambda: lk.spectral_density(H, num_probes=PROBES, num_steps=STEPS, seed=0), repeats)
    out["density"] = {"probes": PROBES, "steps": STEPS, "ours": {"s": t}}

    def ph_density():
        torch_eig_shim()
        h = pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        return {"s": timed(lambda: h.density(iter=STEPS, n_v=PROBES), repeats)[1],
                "note": "PyHessian density ran on a torch.eig shim (torch.linalg.eigh)"}

    out["density"]["pyhessian"] = optional(ph_density)
    ours = out["topk"]["ours"]["s"] + out["trace"]["ours"]["s"] + out["density"]["ours"]["s"]
    theirs = [out[k]["pyhessian"].get("s") for k in ("topk", "trace", "density")]
    out["curvature_stage"] = {"ours_s": ours, "pyhessian_s": sum(theirs) if None not in theirs else None}
    return out


def surface(model, x, y, repeats):
    problem = Problem(model, F.cross_entropy, (x, y), settings=lk.AnalyseSettings())
    U = filter_normalised_directions(problem, 2, 0).float()
    axis = torch.linspace(-1, 1, GRID, dtype=torch.float64)
    D = torch.stack([a * U[0] + b * U[1] for a in axis for b in axis]).float()

    def batched():
        return lk.loss_profiles(model, F.cross_entropy, (x, y), D, [1.0])[:, 0]

    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def loop():
        out = []
        with torch.no_grad():
            for d in D:
                torch.nn.utils.vector_to_parameters(theta + d, model.parameters())
                out.append(float(F.cross_entropy(model(x), y)))
            torch.nn.utils.vector_to_parameters(theta, model.parameters())
        return torch.tensor(out, dtype=torch.float64)

    def stage():
        return lk.analyse(model, F.cross_entropy, (x, y), what="surface", settings=lk.AnalyseSettings(surface_points=GRID))

    a, t_batched = timed(batched, repeats)
    b, t_loop = timed(loop, repeats)
    runs = [stage() for _ in range(repeats)]
    chosen = runs[-1].stages["surface"]
    return {"points": GRID * GRID, "batched_s": t_batched, "loop_s": t_loop,
            "stage_auto_s": float(np.median([r.timings_s["surface"] for r in runs])), "stage_method": chosen["method"],
            "max_abs_diff": float((a - b).abs().max())}


def main(argv=None):
    args = base_parser(__doc__).parse_args(argv)
    torch.manual_seed(0)
    repeats = 1 if args.quick else 3
    report = {"benchmark": "analyse", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": f"CPU ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": repeats, "cases": {}}
    for name, build in (("digits MLP", digits_mlp), ("digits CNN", digits_cnn)):
        model, _, batches = build()
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        case = {"params": sum(p.numel() for p in model.parameters()), "samples": int(y.shape[0])}
        case.update(curvature(model, x, y, repeats))
        case["surface"] = surface(model, x, y, repeats)
        report["cases"][name] = case
        c = case["curvature_stage"]
        print(f"{name}: curvature stage {c['ours_s']:.2f} s vs PyHessian {c['pyhessian_s']} s; surface "
              f"{case['surface']['batched_s']:.2f} s vs loop {case['surface']['loop_s']:.2f} s, the stage (auto: "
              f"{case['surface']['stage_method']}) {case['surface']['stage_auto_s']:.2f} s", flush=True)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
