"""Sharpest-direction tracking overhead per epoch (issue 6, Jastrzębski et al. 2019) on the MNIST SimpleCNN.

The SimpleCNN is trained by SGD (B = 128, lr 0.05) on --train-samples MNIST images for
--warmup-epochs, the top-K eigenvectors are found once, and then at --points tracking points one epoch
(or --every-steps steps) apart the top-K Hessian eigenpairs of the training loss on a fixed subset of
--hessian-samples images (batches of 128) are computed four ways, each on a fresh operator of the same
weights (the gradient graph kept across products for all, so only the solvers differ):

- warm:       this library's lanczos_eigs started from the previous epoch's eigenvectors (block 1,
              what SharpnessTracker does by default);
- warm block: the same with block size K (the previous span exactly);
- cold:       lanczos_eigs from a random vector;
- eigsh:      scipy's ARPACK eigsh on the Hessian-vector product, as the released code does, at the
              same tolerance and at ARPACK's default (machine precision; the released code's setting).

The relative residual max_i ||H v_i - lambda_i v_i|| / lambda_1 of every result is measured with one
more product (untimed), so the accuracies can be compared; tol is 1e-3 relative.

    python bench/sharpness.py --quick --json bench/results/sharpness_cpu.json
"""
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_io import base_parser, write_json  # noqa: E402

from landscape_kernels import HessianOperator  # noqa: E402
from landscape_kernels.training.data import load_mnist  # noqa: E402
from landscape_kernels.linalg.lanczos import lanczos_eigs  # noqa: E402
from landscape_kernels.training.models import simple_cnn  # noqa: E402
from landscape_kernels.training.sharpness import fixed_subset  # noqa: E402
from landscape_kernels.training.trainer import SGDTrainer  # noqa: E402


def relative_residual(H, values, vectors):
    HV = H.matmat(vectors.to(H.dtype))
    lam = torch.as_tensor(values, dtype=H.dtype)
    return float((HV - vectors * lam).norm(dim=0).max() / lam.abs().max())


def solve(name, model, subset, k, tol, v0):
    """(seconds, products, eigenvalues, eigenvectors, relative residual) of one method."""
    t0 = time.perf_counter()
    H = HessianOperator(model, F.cross_entropy, subset, batch_size=128, keep_graph=True)
    if name.startswith("eigsh"):
        from scipy.sparse.linalg import LinearOperator, eigsh

        count = [0]
        matvec = H.to_scipy().matvec

        def counted(v):
            count[0] += 1
            return matvec(v)

        vals, vecs = eigsh(LinearOperator(H.shape, matvec=counted, dtype=np.float64), k=k, which="LA",
                           tol=tol if name == "eigsh" else 0)
        order = np.argsort(vals)[::-1]
        values, vectors, products = torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy()), count[0]
    else:
        warm = name.startswith("warm")
        block = k if name == "warm block" else 1
        r = lanczos_eigs(H, k, tol=tol, v0=v0 if warm else None, block_size=block, residuals="estimate")
        values, vectors, products = r.eigenvalues, r.eigenvectors, r.num_products
    seconds = time.perf_counter() - t0
    return seconds, products, values, vectors.to(H.dtype), relative_residual(H, values, vectors.to(H.dtype))


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--hessian-samples", type=int, default=256)
    parser.add_argument("--warmup-epochs", type=int, default=4,
                        help="epochs trained before tracking starts (the sharpest directions settle early)")
    parser.add_argument("--points", type=int, default=3, help="tracking points after the warm-up")
    parser.add_argument("--every-steps", type=int, default=None,
                        help="SGD steps between tracking points (default: one epoch; the paper's early-phase "
                             "runs track every 128-2048 examples, i.e. every 1-16 steps)")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup_epochs, args.points = min(args.warmup_epochs, 2), min(args.points, 2)
    x, y = load_mnist(args.data_dir, "train")
    x, y = x[: args.train_samples], y[: args.train_samples]
    subset = fixed_subset(x, y, args.hessian_samples, seed=0)
    model = simple_cnn(seed=0)
    trainer = SGDTrainer(model, x, y, batch_size=128, lr=0.05, seed=0)
    spacing = args.every_steps or trainer.steps_per_epoch
    tol, methods = 1e-3, ("warm", "warm block", "cold", "eigsh", "eigsh default tol")
    rows = []
    print(f"SimpleCNN ({sum(p.numel() for p in model.parameters())} parameters), top-{args.k} on "
          f"{args.hessian_samples} images, tol {tol:g}, tracked every {spacing} steps after {args.warmup_epochs} epochs")
    print(f"  {'epoch':>6s} {'method':18s} {'s':>8s} {'products':>8s} {'rel. residual':>14s} {'lambda_1':>10s}")
    trainer.run(max_epochs=args.warmup_epochs, stopping_rule=None)
    H = HessianOperator(model, F.cross_entropy, subset, batch_size=128, keep_graph=True)
    previous = lanczos_eigs(H, args.k, tol=tol, residuals="estimate").eigenvectors
    for _ in range(args.points):
        trainer.run(max_epochs=10**9, max_steps=trainer.step + spacing, stopping_rule=None)
        epoch = trainer.step / trainer.steps_per_epoch
        row, found = {"epoch": epoch, "step": trainer.step}, {}
        for name in methods:
            s, n, values, found[name], res = solve(name, model, subset, args.k, tol, previous)
            row[name] = {"s": s, "products": n, "relative_residual": res, "eigenvalues": values.tolist()}
            print(f"  {epoch:6.2f} {name:18s} {s:8.2f} {n:8d} {res:14.1e} {float(values[0]):10.4f}", flush=True)
        rows.append(row)
        previous = found["warm"]  # what the tracker carries to the next point
    total = {m: sum(r[m]["s"] for r in rows) for m in methods}
    summary = {m: {"s": total[m], "products": sum(r[m]["products"] for r in rows),
                   "x_warm": total[m] / total["warm"]} for m in methods}
    for m in methods:
        print(f"  {m:18s} {total[m]:8.2f} s in all, {summary[m]['products']:5d} products, "
              f"{summary[m]['x_warm']:.2f}x the warm-started time")
    if args.json:
        write_json(args.json, {"benchmark": "sharpness tracking", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "device": "CPU", "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "model": "Jastrzębski et al. 2019 SimpleCNN, SGD B=128 lr=0.05", "train_samples": args.train_samples,
                               "warmup_epochs": args.warmup_epochs, "every_steps": spacing,
                               "hessian_samples": args.hessian_samples, "k": args.k, "tol": tol, "epochs": rows,
                               "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
