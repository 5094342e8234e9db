"""Transformer-size curvature and per-sample statistics (issue 8) on a GPT-style model from torch.nn.

Model: ``landscape_kernels.training.models.gpt`` (vocabulary 1024, width 384, 6 heads, 6 layers, context 128:
11.5M parameters; --quick: width 128, 2 layers), 16 random token sequences of length 128 (seeded),
next-token cross-entropy over every position, float32, the model in eval mode.

1. Top-5 Hessian eigenvalues at tol 1e-3 (relative): ours (``HessianOperator(math_attention=True)`` +
   ``lanczos_eigs``, with the full basis, with ``max_basis=30``, and with that and 4 sequences per chunk) vs hessian-eigenthings ``lanczos`` and curvlinops ``HessianLinearOperator`` +
   scipy ``eigsh`` (both under the math attention backend too: the fused one has no double backward).
   Time, Hessian-vector products, peak memory added (each method in its own process), eigenvalues.
2. The 16 x 16 per-sample gradient Gram matrix: ``PerSampleGradients.gram`` (never 16 x P) vs
   ``torch.func`` vmap(grad) materialising the per-sample gradients.
3. Memory of one analysis step against one training step, each in its own process: a Hessian product
   of the 16 sequences at once and 4 at a time (``batch_size``), and a noise-covariance product with the
   per-sample factors kept and with ``keep_factors=False``.
4. Data-parallel scaling on this CPU: one block of 5 Hessian-vector products with the data on 1 rank
   vs split over 2 gloo ranks (``DistributedOperator``), each rank one thread; the speed-up per extra
   rank is reported as measured.

    python bench/scale.py --json bench/results/scale_cpu.json
    python bench/scale.py --size 100m --device cuda --json bench/results/scale_<gpu>.json   # on a GPU

On CUDA the memory column is the peak allocated device memory added (``torch.cuda.max_memory_allocated``)
and the CPU-rank scaling part is skipped.
"""
import os
import sys
import time
from functools import partial
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_io import base_parser, write_json  # noqa: E402
from anchors import curvlinops_eigsh_top, eigenthings_top  # noqa: E402
from timing import PeakRSS  # noqa: E402

import landscape_kernels as lk  # noqa: E402
from landscape_kernels.training.models import gpt, lm_loss  # noqa: E402

TOL, K, MAX_STEPS, EIGENTHINGS_STEPS = 1e-3, 5, 400, 120  # our Lanczos may take up to MAX_STEPS steps to reach TOL
BOUNDED_BASIS = 30  # lanczos_eigs(max_basis=...): thick restarts keep at most this many vectors


class LMLoss(nn.Module):
    reduction = "mean"  # curvlinops reads it

    def forward(self, logits, targets):
        return lm_loss(logits, targets)


SIZES = {"quick": dict(vocab=1024, d=128, heads=4, layers=2),  # 0.68M parameters
         "10m": dict(vocab=1024, d=384, heads=6, layers=6),  # 11.5M
         "100m": dict(vocab=1024, d=768, heads=12, layers=14)}  # 100.9M, for a GPU


def problem(size, device="cpu", seed=0):
    shape = SIZES[size]
    model = gpt(context=128, seed=seed, **shape).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, shape["vocab"], (16, 128), generator=g).to(device)
    targets = torch.randint(0, shape["vocab"], (16, 128), generator=g).to(device)
    return model, idx, targets


def ours(model, idx, targets, max_basis=None, batch_size=None):
    H = lk.HessianOperator(model, lm_loss, (idx, targets), math_attention=True, batched_backward=False,
                           batch_size=batch_size)
    r = lk.lanczos_eigs(H, K, tol=TOL, seed=0, num_iter=MAX_STEPS, max_basis=max_basis)
    if not r.converged:
        raise RuntimeError(f"not converged in {MAX_STEPS} steps")
    return r.eigenvalues.tolist(), r.num_products


def eigenthings(model, idx, targets):
    vals, products = eigenthings_top(model, LMLoss(), [(idx, targets)], K, TOL, EIGENTHINGS_STEPS)
    return vals, products


def curvlinops_eigsh(model, idx, targets):
    return curvlinops_eigsh_top(model, LMLoss(), [(idx, targets)], K, TOL)


def gram_ours(model, idx, targets):
    ps = lk.PerSampleGradients(model)
    with ps:
        lm_loss(model(idx), targets).backward()
    model.zero_grad(set_to_none=True)
    return ps.gram()


def gram_vmap(model, idx, targets):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, i, t):
        return lm_loss(torch.func.functional_call(model, p, (i[None],)), t[None])

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, idx, targets)
    G = torch.cat([g[n].reshape(idx.shape[0], -1) for n in params], 1)
    return G @ G.T


def measured(fn, model, *args):
    """(output, seconds, peak bytes added): peak RSS on the CPU, peak allocated device memory on CUDA."""
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(model, *args)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out, seconds, torch.cuda.max_memory_allocated() - base if cuda else mem.added


def _one_vector(model):
    P = sum(p.numel() for p in model.parameters())
    return torch.randn(P, generator=torch.Generator().manual_seed(2)).to(next(model.parameters()).device)


def training_step(model, idx, targets):
    lm_loss(model(idx), targets).backward()
    model.zero_grad(set_to_none=True)


def hessian_product(batch_size, method="double_backward"):
    def run(model, idx, targets):
        H = lk.HessianOperator(model, lm_loss, (idx, targets), math_attention=True, batched_backward=False,
                               batch_size=batch_size, method=method)
        H.matvec(_one_vector(model))
    return run


def noise_product(keep_factors):
    def run(model, idx, targets):
        C = lk.NoiseCovarianceOperator(model, lm_loss, (idx, targets), batch_size=4, keep_factors=keep_factors)
        C.matvec(_one_vector(model))
    return run


MEMORY = {"training step (forward + backward, 16 sequences)": training_step,
          "Hessian product, 16 sequences at once": hessian_product(None),
          "Hessian product, 4 at a time (batch_size=4)": hessian_product(4),
          "Hessian product, finite differences (batch_size=4)": hessian_product(4, "finite_difference"),
          "noise-covariance product, factors kept (batch_size=4)": noise_product(True),
          "noise-covariance product, keep_factors=False (batch_size=4)": noise_product(False)}


TOP5 = {"ours": ours, f"ours max_basis={BOUNDED_BASIS}": partial(ours, max_basis=BOUNDED_BASIS),
        f"ours max_basis={BOUNDED_BASIS} batch_size=4": partial(ours, max_basis=BOUNDED_BASIS, batch_size=4), "hessian-eigenthings lanczos": eigenthings,
        "curvlinops + scipy eigsh": curvlinops_eigsh}


def _isolated_worker(_, name, size, device, out_file):
    """One method in a fresh process, so its peak memory is its own (RSS never shrinks)."""
    model, idx, targets = problem(size, device)
    if name in MEMORY:
        try:
            _, s, mem = measured(MEMORY[name], model, idx, targets)
            out = {"s": s, "peak_mib": None if mem is None else mem / 2**20}
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        torch.save(out, out_file)
        return
    fn = TOP5[name]
    try:
        (values, products), s, mem = measured(fn, model, idx, targets)
        out = {"s": s, "products": products, "peak_mib": None if mem is None else mem / 2**20, "eigenvalues": values}
    except Exception as exc:  # an optional library missing or failing is reported, not fatal
        out = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(out, out_file)


def isolated(name, size, device):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        mp.spawn(_isolated_worker, args=(name, size, device, path), nprocs=1, join=True)
        return torch.load(path)


def _scaling_worker(rank, world, init_file, size, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    try:
        from landscape_kernels.operators.distributed import DistributedOperator

        model, idx, targets = problem(size)
        shard = (idx[rank::world], targets[rank::world])
        H = DistributedOperator(lambda d: lk.HessianOperator(model, lm_loss, d, math_attention=True), shard)
        V = torch.randn(H.shape[0], K, generator=torch.Generator().manual_seed(1))
        H.matmat(V[:, :1])  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        H.matmat(V)
        seconds = time.perf_counter() - t0
        torch.save(seconds, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def scaling(size, world):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_scaling_worker, args=(world, os.path.join(tmp, "init"), size, tmp), nprocs=world, join=True)
        return max(torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world))


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: topk, gram, memory, scaling")
    parser.add_argument("--size", choices=[k for k in SIZES if k != "quick"], default="10m",
                        help="10m (11.5M parameters, default) or 100m (100.9M, for a GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--top5", type=lambda v: [m for m in v.split(",") if m], default=None,
                        help=f"comma list of top-5 methods to run (default all): {', '.join(TOP5)}")
    args = parser.parse_args(argv)
    unknown = [m for m in args.top5 or [] if m not in TOP5]
    if unknown:
        parser.error(f"--top5: unknown methods {unknown}; choose from {list(TOP5)}")
    skip = set(filter(None, args.skip.split(",")))
    size = "quick" if args.quick else args.size
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "cuda":
        skip.add("scaling")  # gloo ranks on the CPU; a multi-GPU NCCL run is launched with torchrun instead
    model, idx, targets = problem(size, args.device)
    P = sum(p.numel() for p in model.parameters())
    print(f"GPT-style model, {P / 1e6:.2f}M parameters, 16 x 128 tokens, float32, {args.device}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    if "topk" not in skip:
        for name in args.top5 or TOP5:
            r = results[f"top5 {name}"] = isolated(name, size, args.device)
            if "error" in r:
                print(f"  top-5, {name}: {r['error']}")
                continue
            print(f"  top-5, {name:28s} {r['s']:8.1f} s {r['products']:5d} products  peak +{r['peak_mib'] or 0:7.0f} MiB  "
                  f"lambda_1..5 {' '.join(f'{v:.5g}' for v in r['eigenvalues'])}")
    if "gram" not in skip:
        ref = None
        for name, fn in (("ours", gram_ours), ("torch.func vmap(grad)", gram_vmap)):
            fn(model, idx, targets)  # warm-up
            G, s, mem = measured(fn, model, idx, targets)
            ref = G if ref is None else ref
            err = float((G - ref).abs().max() / ref.abs().max())
            results[f"gram {name}"] = {"s": s, "peak_mib": None if mem is None else mem / 2**20, "max_rel_diff": err}
            print(f"  gram, {name:22s} {s:8.2f} s  peak +{(mem or 0) / 2**20:7.0f} MiB  max rel. diff vs ours {err:.1e}")
    if "memory" not in skip:
        for name in MEMORY:
            r = results[f"memory {name}"] = isolated(name, size, args.device)
            print(f"  memory, {name:60s} " + (r["error"] if "error" in r else f"{r['s']:6.2f} s  peak +{r['peak_mib'] or 0:6.0f} MiB"))
    if "scaling" not in skip:
        one, two = scaling(size, 1), scaling(size, 2)
        results["scaling"] = {"one_rank_s": one, "two_ranks_s": two, "speedup": one / two, "threads_per_rank": 1}
        print(f"  {K} Hessian-vector products, 1 rank {one:.2f} s, 2 ranks {two:.2f} s: speed-up {one / two:.2f}x "
              "(one thread per rank)")
    if args.json:
        write_json(args.json, {"benchmark": "scale (issue 8)", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "parameters": P, "size": size, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
