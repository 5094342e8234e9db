"""Hessian products where the product is not one GEMM: the SimpleCNN and a GPT, in units of a training step.

For each model: one training step (forward + backward of the mean loss, no optimiser) is the unit. Then
the time of one Hessian-vector product by each route the library has (double backward over a kept
gradient graph, the same graph rebuilt per product, forward-over-reverse) and by the peers' routes (a
plain double-backward HVP as scipy ``eigsh`` users write it, curvlinops' ``HessianLinearOperator``),
per column when 8 columns go in one ``matmat``; the top-k eigenvalues at tol 1e-3 by ours (verified by
true residuals, and stopping on the eigenvalues' error estimates as eigenvalues-only callers would) and
by double-backward ``eigsh``, with the number of products and the share of our time spent outside products;
and stochastic Lanczos quadrature with 8 probes run as one block against the same probes one by one.

    python bench/products.py --quick --data-dir ROOT --json bench/results/products_cpu.json
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
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import landscape_kernels as lk  # noqa: E402
from anchors import optional  # noqa: E402
from lanczos import simple_cnn, trained  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402
from scale import LMLoss, problem  # noqa: E402
from timing import Counted, timed  # noqa: E402
from landscape_kernels.linalg import density as lk_density  # noqa: E402
from landscape_kernels.training.data import load_mnist  # noqa: E402
from landscape_kernels.training.models import lm_loss  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
COLUMNS, PROBES, SLQ_STEPS, TOL, MAX_STEPS = 8, 8, 20, 1e-3, 300


def flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def step_time(model, loss_fn, data, repeats):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(data[0]), data[1]).backward()

    step()
    return timed(step, repeats)[1]


def double_backward_matvec(model, loss_fn, data):
    """The HVP scipy-eigsh users write: one gradient graph kept (attention on its math backend, the only
    one with a double backward), one backward through it per product."""
    params = flat_params(model)
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model(data[0]), data[1]), params, create_graph=True)
    sizes = [p.numel() for p in params]

    def mv(v):
        vs = [t.reshape(p.shape) for t, p in zip(v.split(sizes), params)]
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)])

    return mv, sum(sizes)


def curvlinops_matvec(model, loss_module, data):
    from curvlinops import HessianLinearOperator

    with sdpa_kernel(SDPBackend.MATH):
        op = HessianLinearOperator(model, loss_module, flat_params(model), [data])

    def mv(v):
        with sdpa_kernel(SDPBackend.MATH):
            return op @ v

    return mv


def per_product(fn, P, repeats, columns=1):
    V = torch.randn(P, columns, generator=torch.Generator().manual_seed(0))
    call = (lambda: fn(V[:, 0])) if columns == 1 else (lambda: fn(V))
    call()  # first call: graphs and lazy initialisation
    return timed(call, repeats)[1] / columns


def eigsh_top(mv, P, k):
    from scipy.sparse.linalg import LinearOperator, eigsh

    counted = Counted(lambda v: mv(torch.from_numpy(np.asarray(v, dtype=np.float32).ravel())).double().numpy())
    vals = eigsh(LinearOperator((P, P), matvec=counted, dtype=np.float64), k=k, which="LA", tol=TOL,
                 v0=np.random.default_rng(0).standard_normal(P))[0]
    return sorted(vals.tolist(), reverse=True), counted.n


def measure(model, loss_fn, loss_module, data, k, repeats, math_attention=None):
    out = {"params": sum(p.numel() for p in flat_params(model))}
    step = step_time(model, loss_fn, data, max(repeats, 5))
    out["step_s"] = step
    kw = {"math_attention": math_attention} if math_attention is not None else {}
    routes = {
        "ours, double backward, kept graph": lk.HessianOperator(model, loss_fn, data, method="double_backward",
                                                                keep_graph=True, **kw),
        "ours, double backward, graph per product": lk.HessianOperator(model, loss_fn, data, method="double_backward",
                                                                       keep_graph=False, **kw),
        "ours, forward-over-reverse": lk.HessianOperator(model, loss_fn, data, method="forward_over_reverse", **kw),
    }
    P = out["params"]
    product_repeats = max(repeats, 3)  # single products are cheap: medians of 3 even with --quick
    rows = {}
    for name, H in routes.items():
        rows[name] = optional(lambda H=H: {"per_product_s": per_product(H.matvec, P, product_repeats),
                                           "per_column_of_8_s": per_product(H.matmat, P, product_repeats, COLUMNS)})
    rows["double-backward HVP (eigsh users')"] = optional(
        lambda: {"per_product_s": per_product(double_backward_matvec(model, loss_fn, data)[0], P, product_repeats)})
    rows["curvlinops HessianLinearOperator"] = optional(
        lambda: {"per_product_s": per_product(curvlinops_matvec(model, loss_module, data), P, product_repeats)})
    for r in rows.values():
        for key in ("per_product_s", "per_column_of_8_s"):
            if key in r:
                r[key.replace("_s", "_x_step")] = r[key] / step
    out["products"] = rows

    H = routes["ours, double backward, kept graph"]
    H.matvec(torch.zeros(P))  # the kept graph is built outside the timings
    in_products = [0.0]
    matmat = H.matmat

    def timed_matmat(V):  # the time inside products, as the eigensolver asks for them
        t0 = time.perf_counter()
        out = matmat(V)
        in_products[0] += time.perf_counter() - t0
        return out

    H.matmat = timed_matmat
    r, t = timed(lambda: lk.lanczos_eigs(H, k, tol=TOL, seed=0, num_iter=MAX_STEPS), repeats)
    H.matmat = matmat
    inside = in_products[0] / repeats
    # eigenvalues only, as eigsh gives them: stop on their error estimates, no true-residual products. A
    # residual r leaves an eigenvalue error of about r^2 / gap, so tol**2 asks for what a residual tol gives
    r_values, t_values = timed(lambda: lk.lanczos_eigs(H, k, tol=TOL ** 2, seed=0, num_iter=MAX_STEPS,
                                                       residuals="estimate", criterion="eigenvalue"), repeats)
    mv, _ = double_backward_matvec(model, loss_fn, data)
    (vals, n), t_eigsh = timed(lambda: eigsh_top(mv, P, k), repeats)

    def rel_diff(a, b):
        a, b = np.asarray(list(map(float, a))), np.asarray(list(map(float, b)))
        return float(np.max(np.abs(a - b) / np.abs(b)))

    out["topk"] = {"k": k, "tol": TOL,
                   "ours": {"s": t, "products": r.num_products, "outside_products_share": max(0.0, 1 - inside / t),
                            "eigenvalues": r.eigenvalues.tolist()},
                   "ours, eigenvalue criterion": {"s": t_values, "products": r_values.num_products, "tol": TOL ** 2,
                                                  "eigenvalues": r_values.eigenvalues.tolist(),
                                                  "max_rel_diff": rel_diff(r_values.eigenvalues, r.eigenvalues)},
                   "double-backward eigsh": {"s": t_eigsh, "products": n, "x_ours": t_eigsh / t,
                                             "x_ours_eigenvalue_criterion": t_eigsh / t_values,
                                             "max_rel_diff": rel_diff(vals, r.eigenvalues)}}
    V = lk_density.rademacher(P, PROBES, torch.Generator().manual_seed(0), torch.float32)
    _, t_block = timed(lambda: lk_density.lanczos_quadrature(H, V, SLQ_STEPS), repeats)
    _, t_seq = timed(lambda: [lk_density.lanczos_quadrature(H, V[:, c : c + 1], SLQ_STEPS) for c in range(PROBES)], repeats)
    out["slq"] = {"probes": PROBES, "steps": SLQ_STEPS, "batched_s": t_block, "sequential_s": t_seq,
                  "x_batched": t_seq / t_block}
    return out


def print_case(name, c):
    print(f"\n{name}: {c['params']:,} parameters, training step {c['step_s'] * 1e3:.1f} ms")
    for route, r in c["products"].items():
        if "error" in r:
            print(f"  {route:44s} {r['error'][:80]}")
            continue
        cols = f", {r['per_column_of_8_x_step']:.2f} per column of 8" if "per_column_of_8_x_step" in r else ""
        print(f"  {route:44s} {r['per_product_x_step']:.2f} steps per product{cols}")
    t = c["topk"]
    print(f"  top-{t['k']} at tol {t['tol']:g}: ours {t['ours']['s']:.2f} s, {t['ours']['products']} products, "
          f"{100 * t['ours']['outside_products_share']:.0f} % outside products; double-backward eigsh "
          f"{t['double-backward eigsh']['x_ours']:.2f}x ours, {t['double-backward eigsh']['products']} products; "
          f"ours with the eigenvalue criterion {t['ours, eigenvalue criterion']['products']} products, eigsh "
          f"{t['double-backward eigsh']['x_ours_eigenvalue_criterion']:.2f}x its time")
    s = c["slq"]
    print(f"  SLQ {s['probes']} probes x {s['steps']} steps: one block {s['x_batched']:.2f}x faster than probe by probe")


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    report = {"benchmark": "products", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "CPU",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats, "cases": {}}
    torch.manual_seed(0)
    x_all, y_all = load_mnist(args.data_dir, "train")
    cnn = trained(simple_cnn(), x_all[:10000], y_all[:10000], steps=200, lr=0.05)
    cases = {"SimpleCNN, 128 MNIST images": (cnn, F.cross_entropy, nn.CrossEntropyLoss(), (x_all[:128], y_all[:128]), 10, None)}
    model, idx, targets = problem("quick")
    cases["GPT (models.gpt, width 128, 2 layers), 16 x 128 tokens"] = (model, lm_loss, LMLoss(), (idx, targets), 5, True)
    for name, (m, loss_fn, loss_module, data, k, math_attention) in cases.items():
        t0 = time.perf_counter()
        report["cases"][name] = measure(m, loss_fn, loss_module, data, k, repeats, math_attention)
        report["cases"][name]["wall_s"] = time.perf_counter() - t0
        print_case(name, report["cases"][name])
        if args.json:  # after every case, so an interrupted run keeps what it measured
            write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
