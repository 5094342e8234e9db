"""A real transformers model (issue 19): a GPT-2 (``transformers.GPT2LMHeadModel`` from a config, no
download: vocabulary 8192, width 384, 6 layers, 6 heads, context 128, tied input/output embedding;
13.8M parameters; ``--quick``: width 128, 2 layers), 16 random token sequences of 128 tokens (seeded),
mean next-token cross-entropy, float32, eval mode. In one process:

1. Per-sample gradient norms + the 16 x 16 Gram matrix + the per-parameter variance over the batch:
   ``PerSampleGradients`` (one ordinary forward and backward, ``stats()``) vs Opacus ``GradSampleModule``
   and ``torch.func`` vmap(grad) (both materialise the 16 x P per-sample gradients); a plain forward and
   backward is the floor. Median of interleaved rounds; agreement against torch.func.
2. Top-5 Hessian eigenvalues at tol 1e-3: ours (``HessianOperator`` + ``lanczos_eigs``, with the full
   Lanczos basis, with ``max_basis`` 30 and 20 (thick restarts that bound its memory), and stopping on
   the eigenvalues' error estimates at tol 1e-6 (``criterion="eigenvalue"``, eigenvalues only)) vs curvlinops
   ``HessianLinearOperator`` + scipy ``eigsh`` and hessian-eigenthings ``lanczos`` (both given a module
   that returns the logits, and the math attention backend: the fused one has no double backward).
   Each in its own process (minutes of work each, and its peak memory its own); time, Hessian-vector
   products, peak memory added, eigenvalues.

Peak memory: resident memory added inside one call, measured in a fresh process per method (in one
process a method reuses the pages an earlier one freed); on CUDA the peak allocated device memory. A
library that fails on the model is reported with its error.

    python bench/real_models.py --json bench/results/real_models_cpu.json
    python bench/real_models.py --size 124m --device cuda --json bench/results/real_models_<gpu>.json
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="There is a performance drop")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_io import base_parser, keep_earlier_parts, write_json  # noqa: E402
from anchors import curvlinops_eigsh_top, eigenthings_top  # noqa: E402
from timing import PeakRSS  # noqa: E402

import landscape_kernels as lk  # noqa: E402

SIZES = {"quick": dict(vocab_size=1024, n_embd=128, n_layer=2, n_head=4),
         "10m": dict(vocab_size=8192, n_embd=384, n_layer=6, n_head=6),
         "124m": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12)}  # GPT-2 small, for a GPU
B, T, K, TOL = 16, 128, 5, 1e-3


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Logits(nn.Module):
    """What a user of a library that expects a tensor-returning module writes around a transformers model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


class OpacusLogits(Logits):
    """Opacus cannot split a position embedding shared by the batch ((1, T) position ids, its error:
    "Sizes of tensors must match"): its users pass batched position ids."""

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.model(input_ids=ids, position_ids=positions, use_cache=False).logits


class LMLoss(nn.Module):
    reduction = "mean"  # curvlinops reads it

    def forward(self, logits, ids):
        return lm_loss(logits, ids)


def problem(size, device):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=T, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, **SIZES[size])  # no dropout: Opacus records in train mode only
    model = transformers.GPT2LMHeadModel(config).eval().to(device)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    return model, ids


# ------------------------------------------------------------------------------ per-sample methods
def from_matrix(G):
    return {"sq_norms": G.square().sum(1), "gram": G @ G.T, "variance": G.var(0, unbiased=False)}


def ours(model, ids):
    ps = lk.PerSampleGradients(model)
    with ps:
        model.zero_grad(set_to_none=True)
        lm_loss(model(input_ids=ids).logits, ids).backward()
    st = ps.stats()
    return {"sq_norms": st["sq_norms"], "gram": st["gram"],
            "variance": torch.cat([st["variance"][n].flatten() for n in ps.param_names])}


def floor(model, ids):
    model.zero_grad(set_to_none=True)
    lm_loss(model(input_ids=ids).logits, ids).backward()


def func_vmap(model, ids):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, i):
        return lm_loss(functional_call(model, p, (), {"input_ids": i[None], "use_cache": False}).logits, i[None])

    g = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    return from_matrix(torch.cat([g[n].flatten(1) for n in params], 1))


_OPACUS = {}


def opacus(model, ids):
    from opacus import GradSampleModule

    if id(model) not in _OPACUS:  # wrapping once is what a user does; a copy, since its hooks stay on the modules
        _OPACUS[id(model)] = GradSampleModule(OpacusLogits(copy.deepcopy(model)).train(), loss_reduction="mean")
    gsm = _OPACUS[id(model)]
    gsm.zero_grad(set_to_none=True)
    lm_loss(gsm(ids), ids).backward()
    params = [p for _, p in gsm._module.model.named_parameters()]
    G = torch.cat([p.grad_sample.flatten(1) for p in params], 1)  # with loss_reduction="mean": per-sample loss gradients
    for p in params:
        p.grad_sample = None
    return from_matrix(G)


PER_SAMPLE = {"landscape_kernels": ours, "Opacus GradSampleModule": opacus, "torch.func vmap(grad)": func_vmap,
              "plain forward + backward (floor)": floor}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def error_text(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def per_sample_part(model, ids, repeats, size, device):
    ref = func_vmap(model, ids)
    rows, times = {}, {n: [] for n in PER_SAMPLE}
    for name, fn in PER_SAMPLE.items():  # a first call (Opacus wraps, kernels warm up) and the agreement
        try:
            out = fn(model, ids)
            rows[name] = {} if out is None else {"rel_err": {k: rel(out[k], ref[k]) for k in ("sq_norms", "gram", "variance")}}
        except Exception as exc:  # a library that fails on the model is reported, not fatal
            rows[name] = {"error": error_text(exc)}
    for _ in range(repeats):  # interleaved rounds
        for name, fn in PER_SAMPLE.items():
            if "error" in rows[name]:
                continue
            t0 = time.perf_counter()
            fn(model, ids)
            times[name].append(time.perf_counter() - t0)
    for name in PER_SAMPLE:
        if times[name]:
            rows[name]["s"] = statistics.median(times[name])
            rows[name]["peak_added_bytes"] = in_child("persample", name, size, device)["peak_added_bytes"]
    base = rows["landscape_kernels"]["s"]
    for r in rows.values():
        if "s" in r:
            r["x_ours"] = r["s"] / base
    return rows


def in_child(part, method, size, device):
    """Run one method in a fresh process (its peak memory is its own) and return what it reports."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, method, "--size", size, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def child(part, method, size, device):
    model, ids = problem(size, device)
    fn = (PER_SAMPLE if part == "persample" else TOP5)[method]
    if part == "persample":
        fn(model, ids)  # as in the parent: memory of a repeated call, after the first one set up
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn(model, ids)
            seconds = time.perf_counter() - t0
    except Exception as exc:
        print(json.dumps({"error": error_text(exc)}))
        return
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else mem.added
    row = {"s": seconds, "peak_added_bytes": peak}
    if part == "top5":
        row["eigenvalues"], row["products"] = out
    print(json.dumps(row))


# ---------------------------------------------------------------------------------- Hessian top-5
def top5_ours(model, ids, max_basis=None, tol=TOL, **kw):
    H = lk.HessianOperator(model, lm_loss, ({"input_ids": ids}, ids))
    r = lk.lanczos_eigs(H, K, tol=tol, seed=0, num_iter=400, max_basis=max_basis, **kw)
    return r.eigenvalues.tolist(), r.num_products


def top5_curvlinops(model, ids):
    return curvlinops_eigsh_top(Logits(model), LMLoss(), [(ids, ids)], K, TOL)


def top5_eigenthings(model, ids):
    return eigenthings_top(Logits(model), LMLoss(), [(ids, ids)], K, TOL, max_iter=120)


TOP5 = {"landscape_kernels": top5_ours,
        "landscape_kernels, max_basis=30": lambda model, ids: top5_ours(model, ids, max_basis=30),
        "landscape_kernels, max_basis=20": lambda model, ids: top5_ours(model, ids, max_basis=20),
        # eigenvalues only, as eigsh gives them: a residual r leaves an eigenvalue error of about r^2 / gap,
        # so tol**2 on the eigenvalues' error estimates asks for what a residual of tol gives
        "landscape_kernels, eigenvalue criterion": lambda model, ids: top5_ours(
            model, ids, tol=TOL ** 2, criterion="eigenvalue", residuals="estimate"),
        "curvlinops + scipy eigsh": top5_curvlinops, "hessian-eigenthings lanczos": top5_eigenthings}


def top5_part(size, device, rows=None, only=None):
    """Each method in its own process: minutes of work each, and its peak memory its own. ``only``: run
    these methods again and keep the other ``rows``."""
    rows = dict(rows or {})
    for name in TOP5:
        if only is None or name in only:
            rows[name] = in_child("top5", name, size, device)
            print(name, rows[name], flush=True)
    ref = np.array(rows["landscape_kernels"]["eigenvalues"])
    for r in rows.values():
        if "s" in r:
            r["x_ours"] = r["s"] / rows["landscape_kernels"]["s"]
            r["max_rel_diff_to_ours"] = float(np.max(np.abs(np.array(r["eigenvalues"]) - ref) / np.abs(ref)))
    return rows


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None, help="model size (default: 10m; quick with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the per-sample part")
    parser.add_argument("--skip-top5", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("PART", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--rerun-top5", nargs="+", metavar="METHOD", choices=list(TOP5),
                        help="run these top-5 methods again and update their rows in --json, keeping the rest")
    parser.add_argument("--note", help="with --rerun-top5: a note saying why, kept in the results")
    args = parser.parse_args()
    size = args.size or ("quick" if args.quick else "10m")
    if args.child:
        return child(*args.child, size, args.device)
    if args.rerun_top5:
        report = json.load(open(args.json))
        report["top5"] = top5_part(report["size"], args.device, report["top5"], args.rerun_top5)
        if args.note:
            report["notes"] = args.note
        return write_json(args.json, report)
    model, ids = problem(size, args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {size}: {params:,} parameters, {B} x {T} tokens", flush=True)
    report = {"benchmark": "real models (issue 19)", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": f"transformers GPT2LMHeadModel {SIZES[size]}", "size": size,
              "parameters": params, "batch": [B, T], "repeats": 1 if args.quick else args.repeats,
              "per_sample": per_sample_part(model, ids, 1 if args.quick else args.repeats, size, args.device)}
    print(report["per_sample"], flush=True)
    if not args.skip_top5:
        report["top5"] = top5_part(size, args.device)
    else:
        keep_earlier_parts(args.json, report, ["top5"])
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
