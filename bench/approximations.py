"""Curvature approximations: landscape_kernels' diagonals, KFAC and EKFAC against BackPACK and curvlinops.

On three models (an MLP, the Jastrzębski et al. 2019 SimpleCNN, a tiny transformers GPT-2), each method
computes the same quantity of the mean cross-entropy on one fixed batch; every result is compared with
ours (relative error, L2 over all entries, or over products with 4 random vectors for the Kronecker
operators), then the methods are timed in interleaved rounds in this one process (median after one
warm-up round), with the peak memory each one adds.

- exact GGN diagonal: ours (``ggn_diagonal``) vs BackPACK ``DiagGGNExact``;
- empirical Fisher diagonal: ours (``fisher_diagonal``) vs BackPACK ``SumGradSquared`` (times B);
- diagonal estimates from 64 GGN products: our Hutchinson and XDiag vs curvlinops' ``hutchinson_diag``
  and ``xdiag`` on its ``GGNLinearOperator`` (error against the exact diagonal);
- KFAC (type-2, exact output Hessian): ours vs curvlinops ``KFACLinearOperator`` vs BackPACK ``KFLR``;
- EKFAC: ours vs curvlinops ``EKFACLinearOperator``.

    python bench/approximations.py --quick --json bench/results/approximations_cpu.json [--device cuda]

A library missing, or failing on a model (BackPACK and curvlinops have no transformers ``Conv1D``), is
reported as such. Install them as bench/README.md says.
"""
import copy
import os
import statistics
import sys
import warnings
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import landscape_kernels as lk  # noqa: E402
from anchors import optional  # noqa: E402
from lanczos import simple_cnn  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402
from timing import PeakRSS  # noqa: E402

OURS = "landscape_kernels"
PRODUCTS = 64


def gpt2_model():
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=27, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def lm_loss(logits, targets):
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Logits(nn.Module):
    """GPT-2 with its logits as rows (B T, vocabulary), for curvlinops: the same mean cross-entropy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        logits = self.model(tokens).logits
        return logits.reshape(-1, logits.shape[-1])


def cases(device, quick):
    g = torch.Generator().manual_seed(0)
    out = {}
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    B = 128
    out["mlp 784-128-64-10"] = (mlp, torch.randn(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g))
    torch.manual_seed(0)
    cnn = simple_cnn()[1:]  # on (B, 1, 28, 28) images: BackPACK has no Unflatten
    B = 32 if quick else 64
    out["SimpleCNN"] = (cnn, torch.randn(B, 1, 28, 28, generator=g), torch.randint(0, 10, (B,), generator=g))
    try:
        torch.manual_seed(0)
        tokens = torch.randint(0, 27, (4, 32), generator=g)
        out["GPT-2 (2 layers, width 32, T 32)"] = (gpt2_model(), tokens, tokens)
    except ImportError:
        pass
    return {k: (m.to(device).eval(), x.to(device), y.to(device)) for k, (m, x, y) in out.items()}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-300))


# -------------------------------------------------------------------------------- the methods
def backpack_quantity(model, x, y, extension, attribute, names):
    from backpack import backpack, extend

    m = extend(copy.deepcopy(model))  # extend changes the model in place, which breaks torch.func on it after
    loss_fn = extend(nn.CrossEntropyLoss())
    m.zero_grad()
    with backpack(extension()):
        loss_fn(m(x), y).backward()
    params = dict(m.named_parameters())
    return [getattr(params[n], attribute) for n in names]


def curvlinops_op(cls, model, x, y, names, **kwargs):
    params = dict(model.named_parameters())
    return cls(model, nn.CrossEntropyLoss(), [params[n] for n in names], [(x, y)], check_deterministic=False,
               **kwargs)


def kron_products(factors_by_param, shapes, V):
    """Products of a block-diagonal Kronecker matrix (per parameter [G, A] or [G]) with V (P, K)."""
    out, start = [], 0
    for factors, shape in zip(factors_by_param, shapes):
        size = int(torch.Size(shape).numel())
        part = V[start:start + size].T  # (K, size)
        if len(factors) == 1:
            out.append((part @ factors[0]).T)
        else:
            G, A = factors
            M = part.reshape(part.shape[0], G.shape[0], A.shape[0])
            out.append((G @ M @ A).reshape(part.shape[0], -1).T)
        start += size
    return torch.cat(out, 0)


def methods(name, model, x, y):
    """{quantity: {method: function returning a comparable result}} for one model."""
    is_lm = name.startswith("GPT-2")
    loss_fn = lm_loss if is_lm else F.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    covered = lk.kfac_parameters(model)
    data = (x, y)
    probes = torch.randn(sum(p.numel() for n, p in model.named_parameters() if n in covered), 4,
                         generator=torch.Generator().manual_seed(1)).to(x.device, next(model.parameters()).dtype)
    shapes = [p.shape for n, p in model.named_parameters() if n in covered]
    clmodel = Logits(model) if is_lm else model
    clnames = [("model." + n) if is_lm else n for n in covered]
    clnames_all = [("model." + n) if is_lm else n for n in names]

    def curvlinops_ggn():
        import curvlinops

        return curvlinops_op(curvlinops.GGNLinearOperator, clmodel, x, y.reshape(-1) if is_lm else y, clnames_all)

    q = {}
    q["exact GGN diagonal"] = {
        OURS: lambda: flat(lk.ggn_diagonal(model, data, params=names).values()),
        "BackPACK DiagGGNExact": None if is_lm else lambda: flat(backpack_quantity(model, x, y, _bp("DiagGGNExact"),
                                                                                    "diag_ggn_exact", names))}
    q["empirical Fisher diagonal"] = {
        OURS: lambda: flat(lk.fisher_diagonal(model, loss_fn, data, params=names).values()),
        "BackPACK SumGradSquared": None if is_lm else lambda: flat(backpack_quantity(
            model, x, y, _bp("SumGradSquared"), "sum_grad_squared", names)) * x.shape[0]}
    ggn = lk.GGNOperator(model, loss_fn, data, params=names)
    q[f"diagonal from {PRODUCTS} GGN products"] = {
        OURS + " XDiag": lambda: lk.xdiag_diagonal(ggn, PRODUCTS).diagonal,
        OURS + " Hutchinson": lambda: lk.hutchinson_diagonal(ggn, PRODUCTS).diagonal,
        "curvlinops xdiag": lambda: math_attention(lambda: _curvlinops("xdiag")(curvlinops_ggn(), PRODUCTS)),
        "curvlinops hutchinson_diag": lambda: math_attention(
            lambda: _curvlinops("hutchinson_diag")(curvlinops_ggn(), PRODUCTS))}

    def ours_kfac(cls):
        return lambda: cls(model, data, params=covered).matmat(probes)

    def curvlinops_kfac(cls_name):
        def run():
            import curvlinops

            op = curvlinops_op(getattr(curvlinops, cls_name), clmodel, x, y.reshape(-1) if is_lm else y, clnames,
                               fisher_type="type-2")
            return op @ probes
        return run

    def backpack_kflr():
        factors = backpack_quantity(model, x, y, _bp("KFLR"), "kflr", covered)
        return kron_products(factors, shapes, probes)

    q["KFAC (type-2) products"] = {OURS: ours_kfac(lk.KFACOperator),
                                   "curvlinops KFACLinearOperator": curvlinops_kfac("KFACLinearOperator"),
                                   "BackPACK KFLR": None if is_lm else backpack_kflr}
    q["EKFAC products"] = {OURS: ours_kfac(lk.EKFACOperator),
                           "curvlinops EKFACLinearOperator": curvlinops_kfac("EKFACLinearOperator")}
    return q, (lambda: flat(lk.ggn_diagonal(model, data, params=names).values()))


def math_attention(fn):
    """curvlinops' GGN products use forward-mode AD, which the fused attention kernels lack."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return fn()


def _bp(name):
    import backpack.extensions as ext

    return getattr(ext, name)


def _curvlinops(name):
    import curvlinops

    return getattr(curvlinops, name)


# --------------------------------------------------------------------------------- measuring
def measure(fns, repeats, device):
    """{method: {median_s, peak_added_bytes} or {error}}: interleaved rounds, the first a warm-up."""
    results = {m: {} for m in fns}
    values = {}
    for m, fn in fns.items():
        if fn is None:
            results[m] = {"error": "not supported for this model"}
            continue
        got = optional(fn)
        if isinstance(got, dict):
            results[m] = got
        else:
            values[m] = got.detach()
    live = [m for m in fns if m in values]
    times = {m: [] for m in live}
    peaks = {m: [] for m in live}
    for _ in range(repeats):
        for m in live:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            with PeakRSS() as peak:
                t0 = _now(device)
                fns[m]()
                elapsed = _now(device) - t0
            times[m].append(elapsed)
            peaks[m].append(torch.cuda.max_memory_allocated() - start if device.type == "cuda" else peak.added)
    for m in live:
        results[m] = {"median_s": statistics.median(times[m]), "times_s": times[m],
                      "peak_added_bytes": max((p for p in peaks[m] if p is not None), default=None)}
    return results, values


def _now(device):
    import time

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repeats": repeats,
              "note": "medians of interleaved rounds in one process (the first of the rounds counted); errors are "
                      "relative L2 against ours, or, for the estimates, against the exact diagonal; on CPU compare "
                      "ratios, not absolute times", "models": {}}
    for name, (model, x, y) in cases(device, args.quick).items():
        print(f"\n{name}: {sum(p.numel() for p in model.parameters())} parameters, batch {tuple(x.shape)}")
        quantities, exact_diag = methods(name, model, x, y)
        exact = exact_diag().detach()
        entry = {"parameters": sum(p.numel() for p in model.parameters()), "batch": list(x.shape), "quantities": {}}
        for quantity, fns in quantities.items():
            results, values = measure(fns, repeats, device)
            estimate = quantity.startswith("diagonal from")
            ref_name = next((m for m in fns if m.startswith(OURS)), None)
            for m, v in values.items():
                ref = exact if estimate else values.get(ref_name)
                if ref is not None and v.numel() == ref.numel():
                    results[m]["rel_err"] = rel_err(v.reshape(ref.shape).to(ref.dtype), ref)
            ours = results.get(ref_name, {}).get("median_s")
            print(f"  {quantity}")
            for m, r in results.items():
                if "error" in r:
                    print(f"    {m:34s} {r['error']}")
                    continue
                ratio = f"{r['median_s'] / ours:7.2f}x ours" if ours else ""
                mem = f"{r['peak_added_bytes'] / 2**20:8.1f} MiB" if r.get("peak_added_bytes") is not None else ""
                print(f"    {m:34s} {r['median_s'] * 1e3:9.1f} ms {ratio} {mem}  rel err {r.get('rel_err', float('nan')):.2g}")
            entry["quantities"][quantity] = results
        report["models"][name] = entry
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
