"""Per-sample gradient statistics: landscape_kernels against the libraries users would otherwise pick.

For each model, every method computes the same three statistics of the per-sample loss gradients g_b
(squared norms (B,), Gram matrix (B, B), per-parameter variance over the batch) from one forward and
backward pass; "plain backward" is the floor (forward + backward, no statistics). All methods are first
checked to agree with torch.func's materialised per-sample gradients, then timed in interleaved rounds
in this one process (median after warm-up), with the peak memory each one adds.

    python bench/persample.py --quick --json bench/results/persample_cpu.json [--device cuda]

Comparison libraries (optional `bench` extra): BackPACK (BatchL2Grad, Variance, BatchGrad for the Gram),
Opacus GradSampleModule. A library that is missing or fails on a model is reported as such.
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

# BackPACK and Opacus hook full-backward hooks on modules whose inputs need no gradient; their warning
# about it says nothing about the results.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import landscape_kernels as lk  # noqa: E402
from results_io import write_json  # noqa: E402


# ---------------------------------------------------------------------------------------- models
class SeqMLP(nn.Module):
    """Linear layers on (B, T, d) inputs (as in a transformer MLP block), pooled, then a classifier."""

    def __init__(self, d=128, hidden=256, classes=10):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))).mean(1))


def mlp(widths, bias):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


CASES = {
    "mlp_784-50-50-10_B256": dict(model=lambda: mlp([784, 50, 50, 10], bias=False), batch=256, shape=(784,)),
    "wide_mlp_784-1024-1024-10_B128": dict(model=lambda: mlp([784, 1024, 1024, 10], bias=True), batch=128, shape=(784,)),
    "seq_linear_T64_128-256-128-10_B32": dict(model=SeqMLP, batch=32, shape=(64, 128)),
}


# --------------------------------------------------------------------------------------- methods
def stats_from_matrix(G):
    """Statistics from materialised per-sample gradients G (B, P)."""
    return {"sq_norms": G.square().sum(1), "gram": G @ G.T, "variance": G.var(0, unbiased=False)}


def plain_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return None


def landscape_kernels_method(backend):
    def run(model, x, y):
        with lk.ops.use_backend(backend):
            ps = lk.PerSampleGradients(model)
            with ps:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
            st = ps.stats()
            return {"sq_norms": st["sq_norms"], "gram": st["gram"],
                    "variance": torch.cat([st["variance"][n].flatten() for n in ps.param_names])}

    return run


def vmap_grad(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return stats_from_matrix(torch.cat([g[n].flatten(1) for n in params], 1))


def backpack_method(model, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad, Variance

    model = extend(model)  # once per model copy: it only marks the modules
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))  # per-sample loss gradients, as the others
    model.zero_grad(set_to_none=True)
    with backpack(BatchL2Grad(), Variance(), BatchGrad()):
        loss_fn(model(x), y).backward()
    params = list(model.parameters())
    G = torch.cat([p.grad_batch.flatten(1) for p in params], 1)
    out = {"sq_norms": sum(p.batch_l2 for p in params), "gram": G @ G.T,
           "variance": torch.cat([p.variance.flatten() for p in params])}
    for p in params:  # leave the model as found
        del p.grad_batch, p.batch_l2, p.variance
    return out


_OPACUS = {}


def opacus_method(model, x, y):
    from opacus import GradSampleModule

    if id(model) not in _OPACUS:  # wrapping once is what a user does
        _OPACUS[id(model)] = GradSampleModule(model, loss_reduction="sum")
    gsm = _OPACUS[id(model)]
    gsm.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    G = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], 1)
    for p in model.parameters():
        p.grad_sample = None
    return stats_from_matrix(G)


METHODS = {
    "plain backward (floor)": plain_backward,
    "landscape_kernels (compiled)": landscape_kernels_method("compiled"),
    "landscape_kernels (reference)": landscape_kernels_method("reference"),
    "torch.func vmap(grad)": vmap_grad,
    "BackPACK": backpack_method,
    "Opacus": opacus_method,
}
OURS = "landscape_kernels (compiled)"


# -------------------------------------------------------------------------------- measurement
def _pin_malloc_mmap_threshold():
    """glibc raises its mmap threshold after large frees, after which big temporaries come from the
    heap and no longer show in RSS; a fixed threshold keeps every large allocation visible."""
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 256 * 1024))
    except OSError:
        return False


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory added while the block runs: CUDA allocator peak, or sampled RSS on the CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
            self.added = self.peak - self.base
        return False


def rel_err(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(name, case, device, repeats, warmup, methods):
    torch.manual_seed(0)
    model = case["model"]().to(device)
    B = case["batch"]
    x = torch.randn(B, *case["shape"], device=device)
    y = torch.randint(0, 10, (B,), device=device)
    P = sum(p.numel() for p in model.parameters())
    result = {"batch": B, "input_shape": list(case["shape"]), "params": P,
              "per_sample_gradient_bytes": B * P * 4, "methods": {}}
    truth = vmap_grad(model, x, y)
    # Each method gets its own copy of the same weights: BackPACK and Opacus modify the modules they use.
    copies = {m: copy.deepcopy(model) for m in methods}
    active = {}
    for mname in methods:
        entry = result["methods"].setdefault(mname, {})
        try:
            out = METHODS[mname](copies[mname], x, y)
        except Exception as exc:  # a library that cannot handle the model is reported, not hidden
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        if out is not None:
            errs = {k: rel_err(out[k], truth[k]) for k in truth}
            entry["max_rel_err_vs_vmap"] = max(errs.values())
            if entry["max_rel_err_vs_vmap"] > 1e-3:
                entry["error"] = f"disagrees with vmap(grad): {errs}"
                continue
        active[mname] = METHODS[mname]
    times = {m: [] for m in active}
    for r in range(warmup + repeats):  # timing rounds, interleaved, nothing else running
        for mname, fn in active.items():
            sync(device)
            t0 = time.perf_counter()
            fn(copies[mname], x, y)
            sync(device)
            if r >= warmup:
                times[mname].append(time.perf_counter() - t0)
    peaks = {}
    for mname, fn in active.items():  # memory in a pass of its own: the RSS sampler costs CPU time
        with PeakMemory(device) as mem:
            fn(copies[mname], x, y)
        peaks[mname] = mem.added
    floor = statistics.median(times["plain backward (floor)"]) if "plain backward (floor)" in times else None
    ours = statistics.median(times[OURS]) if OURS in times else None
    for mname in active:
        med = statistics.median(times[mname])
        entry = result["methods"][mname]
        entry.update({"median_s": med, "times_s": times[mname], "peak_added_bytes": peaks[mname]})
        if floor:
            entry["x_plain_backward"] = med / floor
        if ours:
            entry["x_landscape_kernels"] = med / ours
    if OURS in active:
        result["profile"] = profile_ours(copies[OURS], x, y, device, repeats)
    return result


def profile_ours(model, x, y, device, repeats):
    """Where our time goes, in multiples of the plain backward and of the weight-gradient GEMMs (one
    sum_b D_b^T A_b per recorded block, the product the backward itself computes once): the recording
    forward + backward, then the statistics (norms, Gram, mean and variance of every block)."""
    ps = lk.PerSampleGradients(model)

    def capture():
        with ps:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

    def stats():  # after a fresh capture() each time (entering the block clears the cached statistics)
        ps.stats()

    def floor():
        plain_backward(model, x, y)

    def weight_gemms():
        for _, A, D in ps.factors():
            torch.mm(D.reshape(-1, D.shape[-1]).T, A.reshape(-1, A.shape[-1]))

    capture()
    fns = {"floor": floor, "capture": capture, "stats": stats, "weight_gemms": weight_gemms}
    times = {k: [] for k in fns}
    for r in range(2 + repeats):
        for k, fn in fns.items():
            if k == "stats":
                capture()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"capture_x_floor": med["capture"] / med["floor"], "stats_x_floor": med["stats"] / med["floor"],
            "stats_in_weight_gemms": med["stats"] / med["weight_gemms"],
            "floor_in_weight_gemms": med["floor"] / med["weight_gemms"]}


def print_table(name, res, device):
    print(f"\n{name}: B={res['batch']}, {res['params']:,} parameters, "
          f"B x P float32 = {res['per_sample_gradient_bytes'] / 2**20:.0f} MiB")
    print(f"  {'method':32s} {'median':>10s} {'x floor':>8s} {'x ours':>8s} {'peak +MiB':>10s} {'rel err':>9s}")
    for mname, e in res["methods"].items():
        if "error" in e:
            print(f"  {mname:32s} {e['error'][:90]}")
            continue
        t = e["median_s"] * 1e3
        shown = f"{t:8.2f}ms" if device.type == "cuda" else f"{t:8.1f}ms"
        print(f"  {mname:32s} {shown:>10s} {e.get('x_plain_backward', 0):8.2f} {e.get('x_landscape_kernels', 0):8.2f} "
              f"{e['peak_added_bytes'] / 2**20:10.1f} {e.get('max_rel_err_vs_vmap', 0):9.1e}")
    if "profile" in res:
        print("  " + profile_text(res["profile"]))


def profile_text(p):
    return (f"profile of ours: recording forward + backward {p['capture_x_floor']:.2f}x the plain backward, then the "
            f"statistics {p['stats_x_floor']:.2f}x ({p['stats_in_weight_gemms']:.1f} weight-gradient GEMMs; the plain "
            f"backward is {p['floor_in_weight_gemms']:.1f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI-sized)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    pinned = _pin_malloc_mmap_threshold() if device.type == "cpu" else None
    repeats, warmup = (5, 1) if args.quick else (15, 2)
    if lk.ops.active_backend(device) != "compiled":
        print(f"note: no compiled kernels for {device.type}; 'compiled' rows will be errors")
    info = lk.info()
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    report = {
        "benchmark": "persample", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model}",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "landscape_kernels": info,
        "repeats": repeats, "warmup": warmup,
        "note": "times are medians of interleaved rounds in one process; on CPU compare ratios, not absolute times",
        "memory": "CUDA allocator peak" if device.type == "cuda" else
        f"sampled RSS above the start of one call (glibc mmap threshold pinned: {pinned})",
        "cases": {},
    }
    print(f"device: {report['device']}, threads {report['threads']}, torch {torch.__version__}")
    for name in args.cases:
        res = run_case(name, CASES[name], device, repeats, warmup, args.methods)
        report["cases"][name] = res
        print_table(name, res, device)
        if args.json:  # written after every case so an interrupted run keeps what it measured
            write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
