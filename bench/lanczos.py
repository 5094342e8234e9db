"""Curvature engine: top-k Hessian eigenvalues, spectral density and trace against PyHessian,
hessian-eigenthings, curvlinops + scipy eigsh and a plain double-backward HVP in scipy eigsh.

Same models and data for all: the Feng & Tu 2021 network (784-50-50-10, no bias) after brief SGD training
on 2560 MNIST training images from --data-dir, and the larger Jastrzębski et al. 2019
SimpleCNN (197k parameters) after brief training on --cnn-samples images (top-k only). Reports time,
Hessian-vector products and the relative error of the eigenvalues against a tight-tolerance reference
(this library at tol 1e-12, cross-checked with eigsh at tol 1e-12). Every method is timed at the
accuracy the comparison asks for, 1e-4 relative error: its tolerance is stepped down 1e-2, 3e-3, 1e-3, ...
and the first run within 1e-4 of the reference counts (the JSON keeps the tolerance used).

    python bench/lanczos.py --quick --json bench/results/lanczos_cpu.json

PyHessian 0.1's density calls torch.eig, removed from torch; it runs here on a shim that answers
torch.eig through torch.linalg.eigh (its input is a symmetric tridiagonal matrix), as the output says.
"""
import os
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import landscape_kernels as lk  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402
from timing import timed  # noqa: E402
from anchors import optional, pyhessian_module, torch_eig_shim  # noqa: E402
from landscape_kernels.kernels import ops as lk_ops  # noqa: E402
from landscape_kernels.linalg import density as lk_density  # noqa: E402
from landscape_kernels.training.data import load_mnist  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def trained_mlp(x, y, steps, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 50, bias=False), nn.ReLU(), nn.Linear(50, 50, bias=False), nn.ReLU(),
                          nn.Linear(50, 10, bias=False))
    return trained(model, x, y, steps, lr=0.1, seed=seed)


def simple_cnn():
    """Jastrzębski et al. 2019 SimpleCNN on 28x28 MNIST: 2xConv(32,3)+ReLU, MaxPool, 2xConv(64,3)+ReLU, MaxPool, 128, 10."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)),
                         nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def trained(model, x, y, steps, lr, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (50,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


class Count:
    def __init__(self):
        self.n = 0


def rel_err(values, reference):
    v, r = np.sort(np.asarray(values, dtype=np.float64))[::-1], np.sort(np.asarray(reference))[::-1][: len(values)]
    return float(np.max(np.abs(v - r) / np.abs(r)))


# ---------------------------------------------------------------------------------- top-k methods
def ours(model, x, y, k, tol, residuals="true", criterion="residual"):
    H = lk.HessianOperator(model, F.cross_entropy, (x, y), keep_graph=True)
    spent = [0.0]
    reorth = lk_ops.lanczos_reorth

    def timed_reorth(*args):
        t0 = time.perf_counter()
        out = reorth(*args)
        spent[0] += time.perf_counter() - t0
        return out

    lk_ops.lanczos_reorth = timed_reorth
    try:
        t0 = time.perf_counter()
        r = lk.lanczos_eigs(H, k, tol=tol, seed=0, residuals=residuals, criterion=criterion)
        total = time.perf_counter() - t0
    finally:
        lk_ops.lanczos_reorth = reorth
    return r.eigenvalues.tolist(), r.num_products, {"reorth_share": spent[0] / total, "converged": r.converged}


def plain_eigsh(model, x, y, k, tol):
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    sizes = [p.numel() for p in params]
    count = Count()

    def mv(v):
        count.n += 1
        vs = [t.reshape(p.shape) for t, p in zip(torch.from_numpy(np.asarray(v, dtype=np.float32).ravel()).split(sizes), params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double().numpy()

    P = sum(sizes)
    vals = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float64), k=k, which="LA", tol=tol,
                 v0=np.random.default_rng(0).standard_normal(P))[0]
    return vals.tolist(), count.n, {}


def curvlinops_eigsh(model, x, y, k, tol):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)]).to_scipy()
    count = Count()

    def mv(v):
        count.n += 1
        return op @ v

    P = op.shape[0]
    vals = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float64), k=k, which="LA", tol=tol,
                 v0=np.random.default_rng(0).standard_normal(P))[0]
    return vals.tolist(), count.n, {}


def eigenthings(model, x, y, k, tol):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(nn.CrossEntropyLoss()))
    count, matvec = Count(), op.matvec

    def counted(v):
        count.n += 1
        return matvec(v)

    op.matvec = counted
    # its default turns reorthogonalisation off beyond 50 steps, which gives spurious copies here
    r = he.lanczos(op, k=k, max_iter=max(2 * k, 60), tol=tol, which="LA", seed=0, reorthogonalize=True)
    return [float(v) for v in r.eigenvalues], count.n, {}


def pyhessian_top(model, x, y, k, tol, max_iter=1000):
    ph = pyhessian_module()

    count, hvp = Count(), ph.hessian_vector_product

    def counted(*args):
        count.n += 1
        return hvp(*args)

    ph.hessian_vector_product = counted
    try:
        h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        ph.hessian_vector_product = hvp
    return [float(v) for v in vals], count.n, {}


OURS = "landscape_kernels lanczos_eigs"
TOPK = {OURS: ours, "PyHessian eigenvalues": pyhessian_top,
        "hessian-eigenthings lanczos": eigenthings, "curvlinops + scipy eigsh": curvlinops_eigsh,
        "double-backward HVP + scipy eigsh": plain_eigsh}


# ------------------------------------------------------------------------- density and trace
def gemm_batching_bound(x, width, probes, repeats):
    """Per-column speed-up of the first layer's GEMM (x @ (in, width)) when `probes` columns share it:
    the Hessian-vector product of this MLP is dominated by two such GEMMs per column, so this is about
    the most that batching the probes can save on this machine."""
    one, wide = torch.randn(x.shape[1], width), torch.randn(x.shape[1], width * probes)
    x @ one, x @ wide  # warm-up
    t_one = timed(lambda: [x @ one for _ in range(10)], max(repeats, 3))[1] / 10
    t_wide = timed(lambda: [x @ wide for _ in range(10)], max(repeats, 3))[1] / 10
    return probes * t_one / t_wide


def density_and_trace(model, x, y, repeats, probes, steps):
    out = {}
    H = lk.HessianOperator(model, F.cross_entropy, (x, y), keep_graph=True)
    V = lk_density.rademacher(H.shape[0], probes, torch.Generator().manual_seed(0), torch.float32)
    H.matmat(V[:, :1])  # builds the kept gradient graph outside the timings
    _, t_batched = timed(lambda: lk_density.lanczos_quadrature(H, V, steps), repeats)
    _, t_seq = timed(lambda: [lk_density.lanczos_quadrature(H, V[:, c : c + 1], steps) for c in range(probes)], repeats)
    # an operator that rebuilds the gradient graph per product, which batching shares over the probes
    H_default = lk.HessianOperator(model, F.cross_entropy, (x, y), keep_graph=False)
    _, t_batched_default = timed(lambda: lk_density.lanczos_quadrature(H_default, V, steps), repeats)
    _, t_seq_default = timed(lambda: [lk_density.lanczos_quadrature(H_default, V[:, c : c + 1], steps)
                                      for c in range(probes)], repeats)

    def pyhessian_density():
        torch_eig_shim()
        h = pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        return {"s": timed(lambda: h.density(iter=steps, n_v=probes), repeats)[1],
                "note": "PyHessian density ran on a torch.eig shim (torch.linalg.eigh)"}

    out["slq"] = {"probes": probes, "steps": steps, "batched_s": t_batched, "sequential_s": t_seq,
                  "default_operator": {"batched_s": t_batched_default, "sequential_s": t_seq_default},
                  "gemm_bound": gemm_batching_bound(x, model[0].weight.shape[0], probes, repeats),
                  "pyhessian": optional(pyhessian_density)}

    n = 100
    (tr, se), t_ours = timed(lambda: lk.hutchinson_trace(H, num_probes=n, seed=0), repeats)

    def pyhessian_trace():
        h = pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        samples, t = timed(lambda: h.trace(maxIter=n, tol=0.0), repeats)
        return {"estimate": float(np.mean(samples)), "s": t, "probes": len(samples)}

    def curvlinops_trace():
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.hutchinson import hutchinson_trace as cl_hutchinson

        cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)])
        est, t = timed(lambda: float(cl_hutchinson(cl, n)), repeats)
        return {"estimate": est, "s": t}

    out["hutchinson"] = {"probes": n, "ours": {"estimate": tr, "stderr": se, "s": t_ours},
                         "pyhessian": optional(pyhessian_trace), "curvlinops": optional(curvlinops_trace)}
    return out


def _ratio(other, ours):
    return f"{other['s'] / ours:.2f}" if "s" in other else other.get("error", "n/a")


TARGET_REL_ERR = 1e-4  # issue 3: top-k compared at this accuracy
TOL_LADDER = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-8)


def at_target_accuracy(fn, ref, repeats):
    """Run ``fn(tol)`` down TOL_LADDER and keep the first (loosest, so fastest) tolerance whose eigenvalues
    are within TARGET_REL_ERR of the reference: every method is timed at the accuracy asked for, not at
    its own default. Without such a tolerance the tightest run is kept and marked."""
    for tol in TOL_LADDER:
        (vals, n, extra), t = timed(lambda tol=tol: fn(tol), repeats)
        row = {"s": t, "products": n, "max_rel_err": rel_err(vals, ref), "tol": tol, **extra}
        if row["max_rel_err"] <= TARGET_REL_ERR:
            return row
    return {**row, "target_missed": True}


def topk_suite(model, x, y, repeats, pyhessian_max_iter=1000):
    """Top-1 and top-10 eigenvalues by every method at TARGET_REL_ERR against a tight-tolerance reference.
    PyHessian's power iteration gets `pyhessian_max_iter` products per eigenvalue (its default is 100).
    Ours is timed three times: with the Lanczos residual estimates (eigenvalues only, as the others give),
    with true residuals (one more product per eigenpair), and stopping on the eigenvalues' error
    estimates min(r, r^2 / gap) instead of the residuals (``criterion="eigenvalue"``)."""
    out = {"topk": {}, "target_rel_err": TARGET_REL_ERR, "tol_ladder": list(TOL_LADDER)}
    reference = lk.lanczos_eigs(lk.HessianOperator(model, F.cross_entropy, (x, y), keep_graph=True), 10,
                                tol=1e-12, num_iter=200, seed=1)
    ref = reference.eigenvalues.numpy()
    check = plain_eigsh(model, x, y, 10, 1e-12)[0]
    out["reference"] = {"eigenvalues": ref.tolist(), "max_rel_diff_vs_eigsh_tight": rel_err(check, ref)}
    print(f"reference top-10 (tol 1e-12): {np.round(ref, 5).tolist()}  (eigsh agrees to {rel_err(check, ref):.1e})")
    methods = {OURS: lambda *a: ours(*a, residuals="estimate"), OURS + " + true residuals": ours,
               OURS + ", eigenvalue criterion": lambda *a: ours(*a, residuals="estimate", criterion="eigenvalue"),
               **{name: fn for name, fn in TOPK.items() if fn is not ours}}
    for fn in methods.values():  # warm-up: first calls pay for lazy initialisation, not for the method
        optional(lambda fn=fn: fn(model, x, y, 1, 1e-1))
    for k in (1, 10):
        rows = {}
        for name, fn in methods.items():
            kw = {"max_iter": pyhessian_max_iter} if fn is pyhessian_top else {}
            try:
                rows[name] = at_target_accuracy(lambda tol, fn=fn, k=k, kw=kw: fn(model, x, y, k, tol, **kw), ref[:k], repeats)
            except Exception as exc:  # reported, not hidden
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        ours_t = rows[OURS]["s"]
        print(f"\ntop-{k} at {TARGET_REL_ERR:.0e} relative error: {'method':44s} {'x ours':>8s} {'tol':>6s} {'HVPs':>6s} {'max rel err':>12s}")
        for name, r in rows.items():
            if "error" in r:
                print(f"        {name:44s} {r['error'][:80]}")
                continue
            r["x_ours"] = r["s"] / ours_t
            print(f"        {name:44s} {r['x_ours']:8.2f} {r['tol']:6.0e} {r['products']:6d} {r['max_rel_err']:12.1e}"
                  + ("  (target missed at every tolerance)" if r.get("target_missed") else "")
                  + (f"  (reorthogonalisation {100 * r['reorth_share']:.1f} % of the time)" if "reorth_share" in r else ""))
        out["topk"][str(k)] = rows
    return out


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    parser.add_argument("--samples", type=int, default=2560)
    parser.add_argument("--cnn-samples", type=int, default=128, help="0 skips the SimpleCNN")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x_all, y_all = load_mnist(args.data_dir, "train")
    model = trained_mlp(x_all[:10000], y_all[:10000], steps=200)
    x, y = x_all[: args.samples], y_all[: args.samples]
    repeats = 1 if args.quick else 3
    P = sum(p.numel() for p in model.parameters())
    report = {"benchmark": "lanczos", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": "CPU", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": "784-50-50-10 MLP, no bias, 200 SGD steps (B=50, lr=0.1) on 10k MNIST images",
              "samples": args.samples, "params": P, "repeats": repeats}
    report["topk_repeats"] = max(repeats, 3)  # top-k on the MLP takes seconds: medians of 3 even with --quick
    report.update(topk_suite(model, x, y, report["topk_repeats"]))
    if args.cnn_samples:
        torch.manual_seed(0)
        cnn = trained(simple_cnn(), x_all[:10000], y_all[:10000], steps=200, lr=0.05)
        xc, yc = x_all[: args.cnn_samples], y_all[: args.cnn_samples]
        print(f"\nSimpleCNN ({sum(p.numel() for p in cnn.parameters())} parameters, {args.cnn_samples} samples)")
        report["cnn"] = {"model": "Jastrzębski et al. 2019 SimpleCNN, 200 SGD steps (B=50, lr=0.05) on 10k MNIST images",
                         "samples": args.cnn_samples, "params": sum(p.numel() for p in cnn.parameters()),
                         "pyhessian_max_iter": 100, **topk_suite(cnn, xc, yc, repeats, pyhessian_max_iter=100)}
    report.update(density_and_trace(model, x, y, repeats, probes=8, steps=80))
    s, hu = report["slq"], report["hutchinson"]
    print(f"\nSLQ {s['probes']} probes x {s['steps']} steps: batched chains {s['sequential_s'] / s['batched_s']:.2f}x "
          f"faster than the same chains one after another; PyHessian density / ours = {_ratio(s['pyhessian'], s['batched_s'])}"
          f" ({s['pyhessian'].get('note', '')})")
    d = s["default_operator"]
    print(f"  with the gradient graph rebuilt per product (keep_graph=False): batched {d['sequential_s'] / d['batched_s']:.2f}x; "
          f"first-layer GEMM shared by {s['probes']} columns is {s['gemm_bound']:.2f}x faster per column on this machine "
          f"(about the most batching can save for this model here)")
    print(f"Hutchinson {hu['probes']} probes: PyHessian / ours = {_ratio(hu['pyhessian'], hu['ours']['s'])}, "
          f"curvlinops / ours = {_ratio(hu['curvlinops'], hu['ours']['s'])}; our estimate {hu['ours']['estimate']:.4f} "
          f"+- {hu['ours']['stderr']:.4f}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
