"""Every op refuses bad arguments alike on every path: the checked wrapper (``landscape_kernels.ops``),
the raw ``torch.ops.landscape_kernels`` entry (the C++ kernel, or the reference where none is built),
the fake (meta) kernel, and a real call with one argument on another device. Each case names the
exception type and a fragment of its message. Cases that need values (NaN, index ranges) run where
values exist: NaN/Inf on the wrapper, index ranges on the wrapper and the raw kernel.
"""
import pytest
import torch

from landscape_kernels import ops

RAW = torch.ops.landscape_kernels
f64, f32 = torch.float64, torch.float32


def _gen():
    return torch.Generator().manual_seed(0)


def _pair():
    g = _gen()
    return {"A": torch.randn(5, 3, 7, dtype=f64, generator=g), "D": torch.randn(5, 3, 4, dtype=f64, generator=g)}


def pair_args():
    return _pair()


def directions_args():
    return {**_pair(), "V": torch.randn(2, 4, 7, dtype=f64, generator=_gen())}


def weights_args():
    return {**_pair(), "W": torch.randn(5, 2, dtype=f64, generator=_gen())}


def centre_args():
    return {**_pair(), "M": torch.randn(4, 7, dtype=f64, generator=_gen())}


def reorth_args():
    g = _gen()
    Q = torch.linalg.qr(torch.randn(10, 6, dtype=f64, generator=g)).Q.T.unsqueeze(0).contiguous()
    return {"Q": Q, "W": torch.randn(1, 2, 10, dtype=f64, generator=g), "j": 3}


def cov_update_args():
    return {"M2": torch.zeros(6, 6, dtype=f64), "mean": torch.zeros(6, dtype=f64), "count": 0,
            "X": torch.randn(4, 6, generator=_gen())}


def project_args():
    basis = torch.linalg.qr(torch.randn(6, 2, dtype=f64, generator=_gen())).Q.T.contiguous()
    return {"X": torch.randn(4, 6, generator=_gen()), "mean": torch.zeros(6, dtype=f64), "basis": basis}


def profile_args():
    g = _gen()
    return {"z0": torch.randn(5, 4, dtype=f64, generator=g), "zd": torch.randn(2, 5, 4, dtype=f64, generator=g),
            "direction": torch.tensor([0, 1, 1]), "offset": torch.tensor([0.1, -0.2, 0.3], dtype=f64),
            "weight": torch.randn(3, 4, dtype=f64, generator=g), "bias": torch.zeros(3, dtype=f64),
            "target": torch.tensor([0, 1, 2, 0, 1])}


def replace(**changes):
    """A mutation: the named arguments replaced by ``fn(args)`` (or a constant)."""
    def mutate(args):
        return {**args, **{k: (v(args) if callable(v) else v) for k, v in changes.items()}}
    return mutate


def nan_at(name):
    def fn(args):
        t = args[name].clone()
        t.view(-1)[0] = float("nan")
        return t
    return fn


def on_meta(name):
    return replace(**{name: lambda a: a[name].to("meta")})


# (label, mutation, exception, message fragment, needs): needs "" (any path), "values" (reads values:
# wrapper and raw kernel), "finite" (the wrapper's NaN/Inf check only), "real" (real paths only: one
# argument moved to the meta device, or a layout .to("meta") would not keep).
PAIR_CASES = [
    ("A rank 1", replace(A=lambda a: a["A"][:, 0, 0]), ValueError, "A (layer inputs) must have shape", ""),
    ("A rank 4", replace(A=lambda a: a["A"][..., None]), ValueError, "A (layer inputs) must have shape", ""),
    ("D rank differs", replace(D=lambda a: a["D"][:, 0]), ValueError, "must have the same rank as A", ""),
    ("A int", replace(A=lambda a: a["A"].int(), D=lambda a: a["D"].int()), TypeError, "A must be float32 or float64", ""),
    ("D float32", replace(D=lambda a: a["D"].float()), TypeError, "D must have A's dtype", ""),
    ("batch sizes differ", replace(D=lambda a: a["D"][:4]), ValueError, "same batch size", ""),
    ("empty batch", replace(A=lambda a: a["A"][:0], D=lambda a: a["D"][:0]), ValueError, "empty batch", ""),
    ("positions differ", replace(D=lambda a: a["D"][:, :2]), ValueError, "same number of positions", ""),
    ("no positions", replace(A=lambda a: a["A"][:, :0], D=lambda a: a["D"][:, :0]), ValueError, "T = 0 positions", ""),
    ("no features", replace(A=lambda a: a["A"][..., :0]), ValueError, "non-empty last dimension", ""),
    ("D on meta", on_meta("D"), ValueError, "D must be on A's device", "real"),
    ("NaN in A", replace(A=nan_at("A")), ValueError, "A contains", "finite"),
    ("Inf in D", replace(D=lambda a: a["D"].index_fill(0, torch.tensor([2]), float("inf"))), ValueError, "D contains",
     "finite"),
]
CENTRE_CASES = [
    ("M wrong shape", replace(M=lambda a: a["M"][:, :6]), ValueError, "M (the centre) must have shape", ""),
    ("M float32", replace(M=lambda a: a["M"].float()), TypeError, "M must have A's dtype", ""),
    ("M on meta", on_meta("M"), ValueError, "M must be on A's device", "real"),
    ("NaN in M", replace(M=nan_at("M")), ValueError, "M contains", "finite"),
]
DIRECTION_CASES = [
    ("V wrong in", replace(V=lambda a: a["V"][..., :6]), ValueError, "V (directions) must have shape", ""),
    ("V rank 2", replace(V=lambda a: a["V"][0]), ValueError, "V (directions) must have shape", ""),
    ("V empty", replace(V=lambda a: a["V"][:0]), ValueError, "V holds no directions", ""),
    ("V float32", replace(V=lambda a: a["V"].float()), TypeError, "V must have A's dtype", ""),
    ("V on meta", on_meta("V"), ValueError, "V must be on A's device", "real"),
    ("NaN in V", replace(V=nan_at("V")), ValueError, "V contains", "finite"),
]
WEIGHT_CASES = [
    ("W wrong batch", replace(W=lambda a: a["W"][:4]), ValueError, "W (weights) must have shape", ""),
    ("W empty", replace(W=lambda a: a["W"][:, :0]), ValueError, "W holds no weight vectors", ""),
    ("W float32", replace(W=lambda a: a["W"].float()), TypeError, "W must have A's dtype", ""),
    ("W on meta", on_meta("W"), ValueError, "W must be on A's device", "real"),
    ("NaN in W", replace(W=nan_at("W")), ValueError, "W contains", "finite"),
]
REORTH_CASES = [
    ("Q rank 2", replace(Q=lambda a: a["Q"][0]), ValueError, "Q (bases) must have shape", ""),
    ("W rank 2", replace(W=lambda a: a["W"][0]), ValueError, "W (new vectors) must have shape", ""),
    ("P differs", replace(W=lambda a: a["W"][..., :9]), ValueError, "must agree in C and P", ""),
    ("C differs", replace(W=lambda a: a["W"].expand(2, 2, 10)), ValueError, "must agree in C and P", ""),
    ("W empty", replace(W=lambda a: a["W"][:, :0]), ValueError, "W must be non-empty", ""),
    ("j above m", replace(j=7), ValueError, "j (basis vectors in use) must be", ""),
    ("j negative", replace(j=-1), ValueError, "j (basis vectors in use) must be", ""),
    ("Q int", replace(Q=lambda a: a["Q"].int(), W=lambda a: a["W"].int()), TypeError, "Q must be float32 or float64", ""),
    ("W float32", replace(W=lambda a: a["W"].float()), TypeError, "W must have Q's dtype", ""),
    ("W on meta", on_meta("W"), ValueError, "W must be on Q's device", "real"),
]
COV_UPDATE_CASES = [
    ("M2 wrong shape", replace(M2=torch.zeros(5, 5, dtype=f64)), ValueError, "M2 must have shape", ""),
    ("mean wrong shape", replace(mean=torch.zeros(5, dtype=f64)), ValueError, "mean must have shape", ""),
    ("mean float32", replace(mean=torch.zeros(6)), TypeError, "mean must be float64", ""),
    ("M2 strided", replace(M2=torch.zeros(6, 12, dtype=f64)[:, ::2]), ValueError, "must be contiguous", "real"),
    ("count negative", replace(count=-1), ValueError, "count (snapshots merged so far) must be", ""),
    ("count near 2^63", replace(count=2**63 - 2), ValueError, "exceeds 2^53", ""),
    ("X rank 1", replace(X=lambda a: a["X"][0]), ValueError, "X (snapshots) must have shape", ""),
    ("X empty", replace(X=lambda a: a["X"][:0]), ValueError, "at least one snapshot", ""),
    ("X int", replace(X=lambda a: a["X"].int()), TypeError, "X must be float32 or float64", ""),
    ("mean on meta", on_meta("mean"), ValueError, "mean must be on X's device", "real"),
    ("NaN in X", replace(X=nan_at("X")), ValueError, "X contains", "finite"),
]
PROJECT_CASES = [
    ("basis wrong N", replace(basis=lambda a: a["basis"][:, :5]), ValueError, "basis must have shape", ""),
    ("basis rank 1", replace(basis=lambda a: a["basis"][0]), ValueError, "basis must have shape", ""),
    ("basis float32", replace(basis=lambda a: a["basis"].float()), TypeError, "basis must be float64", ""),
    ("mean wrong shape", replace(mean=torch.zeros(7, dtype=f64)), ValueError, "mean must have shape", ""),
    ("X rank 3", replace(X=lambda a: a["X"][None]), ValueError, "X (snapshots) must have shape", ""),
    ("basis on meta", on_meta("basis"), ValueError, "basis must be on X's device", "real"),
    ("NaN in X", replace(X=nan_at("X")), ValueError, "X contains", "finite"),
]
PROFILE_CASES = [
    ("z0 rank 3", replace(z0=lambda a: a["z0"][None]), ValueError, "z0 must have shape", ""),
    ("z0 int", replace(z0=lambda a: a["z0"].int()), TypeError, "z0 must be float32 or float64", ""),
    ("zd wrong H", replace(zd=lambda a: a["zd"][..., :3]), ValueError, "zd must have shape", ""),
    ("zd empty", replace(zd=lambda a: a["zd"][:0]), ValueError, "zd must have shape", ""),
    ("direction float", replace(direction=lambda a: a["direction"].double()), ValueError, "direction must be a 1-D int64", ""),
    ("offset wrong length", replace(offset=lambda a: a["offset"][:2]), ValueError, "offset must have shape", ""),
    ("weight wrong H", replace(weight=lambda a: a["weight"][:, :3]), ValueError, "weight must have shape", ""),
    ("bias wrong C", replace(bias=lambda a: a["bias"][:2]), ValueError, "bias must have shape", ""),
    ("target float", replace(target=lambda a: a["target"].double()), ValueError, "target must be int64", ""),
    ("weight float32", replace(weight=lambda a: a["weight"].float()), TypeError, "must have z0's dtype", ""),
    ("direction out of range", replace(direction=torch.tensor([0, 2, 1])), ValueError, "direction", "values"),
    ("negative direction", replace(direction=torch.tensor([0, -1, 1])), ValueError, "direction", "values"),
    ("class out of range", replace(target=torch.tensor([0, 1, 3, 0, 1])), ValueError, "target", "values"),
    ("zd on meta", on_meta("zd"), ValueError, "must be on z0's device", "real"),
    ("NaN in z0", replace(z0=nan_at("z0")), ValueError, "z0 contains", "finite"),
]

TABLE = {
    "per_sample_sq_norms": (pair_args, PAIR_CASES),
    "per_sample_gram": (pair_args, PAIR_CASES),
    "per_sample_moments": (pair_args, PAIR_CASES),
    "per_sample_stats": (pair_args, PAIR_CASES),
    "per_sample_stats_about": (centre_args, PAIR_CASES + CENTRE_CASES),
    "per_sample_project": (directions_args, PAIR_CASES + DIRECTION_CASES),
    "per_sample_cov_matvec": (directions_args, PAIR_CASES + DIRECTION_CASES),
    "per_sample_weighted_sum": (weights_args, PAIR_CASES + WEIGHT_CASES),
    "lanczos_reorth": (reorth_args, REORTH_CASES),
    "trajectory_cov_update": (cov_update_args, COV_UPDATE_CASES),
    "trajectory_project": (project_args, PROJECT_CASES),
    "profile_ce_losses": (profile_args, PROFILE_CASES),
}
PATHS = ("wrapper", "raw", "meta")


def _applies(needs, path):
    return {"": True, "values": path != "meta", "finite": path == "wrapper", "real": path != "meta"}[needs]


CASES = [pytest.param(name, label, path, id=f"{name}-{label}-{path}")
         for name, (_, cases) in TABLE.items() for label, _, _, _, needs in cases for path in PATHS
         if _applies(needs, path)]


def _call(name, args, path):
    values = list(args.values())
    if path == "wrapper":
        return getattr(ops, name)(*values)
    if path == "meta":
        values = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in values]
    return getattr(RAW, name)(*values)


def test_the_valid_arguments_pass_every_path():
    for name, (build, _) in TABLE.items():
        for path in PATHS:
            _call(name, build(), path)


@pytest.mark.parametrize("name,label,path", CASES)
def test_a_bad_op_argument_is_refused_with_a_clear_error(name, label, path):
    build, cases = TABLE[name]
    _, mutate, exc, fragment, _ = next(c for c in cases if c[0] == label)
    with pytest.raises(exc) as info:
        _call(name, mutate(build()), path)
    assert fragment in str(info.value) and name in str(info.value), str(info.value)


def test_the_fake_kernels_compute_no_values():
    """A meta call answers with meta tensors (shapes only); nothing real is produced from meta inputs."""
    for name, (build, _) in TABLE.items():
        out = _call(name, build(), "meta")
        for t in (out if isinstance(out, tuple) else (out,)):
            assert t is None or t.device.type == "meta", name
