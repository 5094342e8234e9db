"""Zhang, Yang & Tu 2026 measurement costs (issue 7) on the 784-50-50-10 MLP and its 50 x 50 matrix W2 (2500 weights),
MNIST 2000 per class (20,000 images), B = 50, float64:

1. C_ii = v_i^T C v_i for all 2500 eigenvectors of H, i.e. the minibatch gradients of one shuffled pass
   and their covariance in H's eigenbasis (C_ii from the projections of the minibatch gradients, the
   same for every way), four ways:
   - factored: the layer's per-sample factors (input, output gradient) from one forward/backward per
               chunk of whole minibatches, one batched GEMM into the minibatch gradients (our default);
   - fused:    per-sample gradients summed into their minibatches by our per_sample_weighted_sum kernel;
   - loop:     one forward/backward per minibatch (materialising each minibatch gradient; what the
               authors' code does);
   - vmap:     torch.func per-sample gradients (vmap(grad)) then a segment sum.
2. E_p[h_p^2] (2500 x 2500): our Kronecker identity over all 20,000 samples vs torch.func
   vmap(hessian) per-sample Hessians on --vmap-samples samples, its time scaled to all samples.

    python bench/noise_curvature.py --quick --json bench/results/noise_curvature_cpu.json
"""
import os
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_io import base_parser, write_json  # noqa: E402
from timing import timed  # noqa: E402

from landscape_kernels.analyses.noise_curvature import (  # noqa: E402
    hessian_second_moment, layer_factors, layer_hessian, minibatch_assignment, minibatch_covariance,
    minibatch_gradients)
from landscape_kernels.training.data import balanced_subset, load_mnist  # noqa: E402
from landscape_kernels.training.models import mlp  # noqa: E402

PARAM = "2.weight"


def vmap_minibatch_gradients(model, x, y, batch_size, seed, chunk=2048):
    """Minibatch gradients from torch.func per-sample gradients and a segment sum."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(w, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, {**params, PARAM: w}, (xi[None],)), yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    batch = minibatch_assignment(x.shape[0], batch_size, seed)
    nb = int(batch.max()) + 1
    out = torch.zeros(nb + 1, params[PARAM].numel(), dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        g = per_sample(params[PARAM], x[i : i + chunk], y[i : i + chunk]).reshape(-1, out.shape[1])
        rows = torch.where(batch[i : i + chunk] < 0, nb, batch[i : i + chunk])  # dropped samples -> a spare row
        out.index_add_(0, rows, g / batch_size)
    return out[:nb]


def vmap_second_moment(model, x, y):
    """(1/n) sum_p h_p^2 from torch.func per-sample Hessians of W2."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    w = params[PARAM]

    def loss(wv, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, {**params, PARAM: wv.reshape(w.shape)}, (xi[None],)),
                               yi[None])

    h = torch.func.vmap(torch.func.hessian(loss), in_dims=(None, 0, 0))(w.reshape(-1), x, y)
    return (h @ h).mean(0)


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--vmap-samples", type=int, default=16)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    x, y = load_mnist(args.data_dir, "train")
    x, y = balanced_subset(x, y, args.per_class, seed=0)
    x = x.double()
    model = mlp(seed=0).double()
    print(f"MNIST {x.shape[0]} images, 784-50-50-10, {PARAM} (2500 weights), float64, threads {torch.get_num_threads()}")
    H = layer_hessian(layer_factors(model, F.cross_entropy, x, y, PARAM))
    V = torch.linalg.eigh(H).eigenvectors

    def c_diag(gradients):  # C_ii = mean_b (g_b . v_i)^2 - (gbar . v_i)^2, without forming C
        P = gradients @ V
        return P.square().mean(0) - P.mean(0).square()

    results = {}
    ways = {"factored": lambda: minibatch_gradients(model, F.cross_entropy, x, y, PARAM, 50, seed=0),
            "fused": lambda: minibatch_gradients(model, F.cross_entropy, x, y, PARAM, 50, seed=0, method="fused"),
            "loop": lambda: minibatch_gradients(model, F.cross_entropy, x, y, PARAM, 50, seed=0, method="loop"),
            "vmap": lambda: vmap_minibatch_gradients(model, x, y, 50, seed=0)}
    G = ways["factored"]()
    C = minibatch_covariance(G)
    check = float((c_diag(G) - ((C @ V) * V).sum(0)).abs().max() / ((C @ V) * V).sum(0).abs().max())
    print(f"  C_ii from the projections vs v_i^T C v_i: max rel. diff {check:.1e}")
    ref, (_, s_diag) = None, timed(lambda: c_diag(G), repeats)
    results["c_diag_from_gradients_s"] = s_diag
    print(f"  C_ii of all 2500 directions from the {G.shape[0]} minibatch gradients (common to all): {s_diag:.3f} s")
    for name, fn in ways.items():
        grads, s = timed(fn, repeats)
        out = c_diag(grads)
        ref = out if ref is None else ref
        err = float((out - ref).abs().max() / ref.abs().max())
        results[f"gradients_{name}"] = {"s": s, "max_rel_diff_c_ii_vs_factored": err}
        print(f"  minibatch gradients, {name:8s} {s:8.3f} s   C_ii max |diff| / max C_ii vs factored {err:.1e}")
    for name in ("fused", "loop", "vmap"):
        r = results[f"gradients_{name}"]
        r["x_factored"] = r["s"] / results["gradients_factored"]["s"]
        r["x_factored_with_c_ii"] = (r["s"] + s_diag) / (results["gradients_factored"]["s"] + s_diag)
        print(f"  factored is {r['x_factored']:.1f}x faster than {name} ({r['x_factored_with_c_ii']:.1f}x with C_ii)")

    n = args.vmap_samples
    E2, s_kron = timed(lambda: hessian_second_moment(layer_factors(model, F.cross_entropy, x, y, PARAM)), repeats)
    sub_kron, s_kron_sub = timed(lambda: hessian_second_moment(layer_factors(model, F.cross_entropy, x[:n], y[:n], PARAM)),
                                 repeats)
    sub_vmap, s_vmap_sub = timed(lambda: vmap_second_moment(model, x[:n], y[:n]), repeats)
    err = float((sub_kron - sub_vmap).abs().max() / sub_vmap.abs().max())
    per_sample_vmap, per_sample_kron = s_vmap_sub / n, s_kron / x.shape[0]
    results["second_moment"] = {"kronecker_all_s": s_kron, "samples": x.shape[0], "vmap_samples": n,
                                "vmap_s": s_vmap_sub, "kronecker_same_samples_s": s_kron_sub,
                                "vmap_all_estimated_s": per_sample_vmap * x.shape[0],
                                "x_kronecker_per_sample": per_sample_vmap / per_sample_kron,
                                "x_kronecker_same_samples": s_vmap_sub / s_kron_sub,
                                "max_rel_diff_vs_vmap": err}
    print(f"  E_p[h_p^2], Kronecker identity, all {x.shape[0]} samples: {s_kron:.2f} s")
    print(f"  vmap(hessian) on {n} samples: {s_vmap_sub:.2f} s (Kronecker on the same: {s_kron_sub:.3f} s, "
          f"max rel. diff {err:.1e}); scaled to all samples {per_sample_vmap * x.shape[0]:.0f} s")
    print(f"  per sample: Kronecker {per_sample_vmap / per_sample_kron:.0f}x faster than vmap(hessian)")
    if args.json:
        write_json(args.json, {"benchmark": "noise-curvature (Zhang, Yang & Tu 2026)",
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "CPU",
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
                               "samples": x.shape[0], "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
