"""``analyse`` on a model whose every answer is known in closed form: a linear least-squares model
(two Linear layers on disjoint features, summed), loss (1/2N) sum (f(x_n) - y_n)^2. Its Hessian is
X^T X / N (block diagonal per layer: X_l^T X_l / N), the GGN equals it, the per-sample gradients are
r_n x_n, and the loss along any direction is exactly quadratic."""
import json
import math

import numpy as np
import pytest
import torch

import landscape_kernels as lk
from landscape_kernels.analyses.analyse import STAGES
from landscape_kernels.analyses.analyse.noise import jackknife_noise_scale, noise_scale
from landscape_kernels.analyses.analyse.settings import resolve_stages

N, D1, D2 = 150, 7, 5


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(D1, 1, bias=False)
        self.b = torch.nn.Linear(D2, 1, bias=False)

    def forward(self, x):
        return self.a(x[:, :D1]) + self.b(x[:, D1:])


def half_mse(out, y):
    return 0.5 * (out - y).pow(2).mean()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, D1 + D2, generator=g, dtype=torch.float64) * torch.linspace(0.4, 2.0, D1 + D2, dtype=torch.float64)
    y = X @ torch.randn(D1 + D2, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoBlocks().double()
    settings = lk.AnalyseSettings(top_k=4, tol=1e-10, density_steps=D1 + D2, trace_products=45, profile_points=7,
                                  surface_points=5, random_directions=2)
    result = lk.analyse(model, half_mse, (X, y), batch_size=40, settings=settings)
    w = torch.cat([model.a.weight.detach().reshape(-1), model.b.weight.detach().reshape(-1)])
    r = X @ w - y[:, 0]
    G = r[:, None] * X  # per-sample gradients
    return {"model": model, "X": X, "y": y, "w": w, "G": G, "H": X.T @ X / N, "result": result}


def close(a, b, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def test_hessian_ggn_trace_and_density(problem):
    st, H = problem["result"].stages, problem["H"]
    top = torch.linalg.eigvalsh(H).flip(0)
    close(st["hessian"]["eigenvalues"], top[:4])
    close(st["ggn"]["eigenvalues"], top[:4])  # a linear model: the GGN is the Hessian
    assert st["hessian"]["converged"] and max(st["hessian"]["relative_residuals"]) < 1e-8
    close(st["trace"]["trace"], H.trace())  # Hutch++ with a sketch wider than P is exact
    frob = float(torch.linalg.matrix_norm(H))
    assert abs(st["trace"]["frobenius"] - frob) < 4 * st["trace"]["frobenius_stderr"] + 1e-9
    d = st["density"]
    close([d["lambda_min"], d["lambda_max"]], [top[-1], top[0]], rtol=1e-7)  # as many steps as P: exact nodes
    assert d["negative_mass"][0] == 0 and d["negative_curvature_share"][0] == 0  # positive definite
    assert abs(d["trace_slq"][0] - float(H.trace())) < 4 * d["trace_slq"][1]


def test_layer_blocks(problem):
    rows = {r["layer"]: r for r in problem["result"].stages["layers"]["layers"]}
    X = problem["X"]
    assert set(rows) == {"a", "b"}
    for name, cols in (("a", slice(0, D1)), ("b", slice(D1, None))):
        block = X[:, cols].T @ X[:, cols] / N
        close(rows[name]["top_eigenvalue"], torch.linalg.eigvalsh(block)[-1], rtol=1e-6)


def test_noise_scale_snr_and_spectrum(problem):
    n, G = problem["result"].stages["noise"], problem["G"]
    gbar = G.mean(0)
    C1 = (G - gbar).T @ (G - gbar) / N
    trace = float(((G - gbar) ** 2).sum() / (N - 1))
    signal = float((N * N * gbar.pow(2).sum() - G.pow(2).sum()) / (N * (N - 1)))
    close(n["noise_trace"], trace)
    close(n["signal_sq_norm"], signal)
    close(n["b_simple"], trace / signal)
    close(n["spectrum"]["eigenvalues"], torch.linalg.eigvalsh(C1).flip(0)[:4])
    close(sorted(n["norm_quantiles"].values()), np.quantile(G.norm(dim=1).numpy(), [0, .05, .25, .5, .75, .95, 1]))
    for layer in n["layers"]:
        cols = slice(0, D1) if layer["layer"] == "a" else slice(D1, None)
        Gl = G[:, cols]
        close(layer["snr"], float(Gl.mean(0).pow(2).sum() / ((Gl - Gl.mean(0)) ** 2).sum(1).mean()))


def test_jackknife_matches_leave_one_out_by_hand(problem):
    G = problem["G"]
    s, gbar = G.pow(2).sum(1).numpy(), G.mean(0)
    p = (G @ gbar).numpy()
    loo = []
    for i in range(N):
        rest = torch.cat([G[:i], G[i + 1:]])
        loo.append(noise_scale(rest.pow(2).sum(1).numpy(), float(rest.mean(0).pow(2).sum()))[2])
    loo = np.array(loo)
    by_hand = math.sqrt((N - 1) / N * ((loo - loo.mean()) ** 2).sum())
    close(jackknife_noise_scale(s, p, float(gbar.pow(2).sum())), by_hand)
    close(problem["result"].stages["noise"]["b_simple_stderr"], by_hand)


def test_noise_against_curvature(problem):
    res, G = problem["result"], problem["G"]
    gbar = G.mean(0)
    C1 = (G - gbar).T @ (G - gbar) / N
    V = torch.from_numpy(res.arrays["hessian_eigenvectors"])  # (k, P)
    close(res.stages["overlap"]["C_ii"], ((V @ C1) * V).sum(1))
    _, evecs = torch.linalg.eigh(C1)
    VC = evecs.flip(1)[:, :4].T
    close(res.stages["overlap"]["subspace_overlap"], float(((V @ VC.T) ** 2).sum() / 4), rtol=1e-6)
    fit = res.stages["overlap"]["gamma"]
    lam, cii = np.array(res.stages["overlap"]["H_ii"]), np.array(res.stages["overlap"]["C_ii"])
    close(fit["exponent"], np.polyfit(np.log(lam), np.log(cii), 1)[0])


def test_profiles_and_surface_are_the_exact_quadratic(problem):
    res, H, G = problem["result"], problem["H"], problem["G"]
    L0, g = res.loss, G.mean(0).numpy()
    Hn = H.numpy()

    def quadratic(d, delta):
        return L0 + delta * (g @ d) + 0.5 * delta ** 2 * (d @ Hn @ d)

    V, deltas = res.arrays["hessian_eigenvectors"], res.arrays["eigen_deltas"]
    close(res.arrays["eigen_profiles"], [[quadratic(v, t) for t in deltas] for v in V])
    close(res.stages["profiles"]["eigen_curvature"], res.stages["hessian"]["eigenvalues"], rtol=1e-6)
    R = res.arrays["random_directions"]
    close(res.arrays["random_profiles"], [[quadratic(r, t) for t in res.arrays["random_deltas"]] for r in R])
    axis = res.arrays["surface_axis"]
    close(res.arrays["surface"], [[quadratic(a * R[0] + b * R[1], 1.0) for b in axis] for a in axis])


@pytest.mark.parametrize("method", ["batched", "loop"])
def test_each_landscape_method_gives_the_exact_quadratic_and_restores_the_weights(problem, method):
    """The batched engine and the point loop, each forced, give the closed form; auto (the fixture) timed
    both on half of each stage's first points and kept one."""
    res = problem["result"]
    for stage in ("profiles", "surface"):
        assert res.stages[stage]["method"] in ("batched", "loop")
        assert set(res.stages[stage]["seconds_per_point"]) == {"batched", "loop"}
    model, X, y = problem["model"], problem["X"], problem["y"]
    settings = lk.AnalyseSettings(top_k=4, tol=1e-10, profile_points=7, surface_points=5, landscape_method=method)
    forced = lk.analyse(model, half_mse, (X, y), batch_size=40, what=["profiles", "surface"], settings=settings)
    for key in ("eigen_profiles", "random_profiles", "surface"):
        close(forced.arrays[key], res.arrays[key], rtol=1e-10, atol=1e-12)
    assert forced.stages["surface"]["method"] == method and forced.stages["surface"]["seconds_per_point"] is None
    w = torch.cat([model.a.weight.detach().reshape(-1), model.b.weight.detach().reshape(-1)])
    assert torch.equal(w, problem["w"])  # the loop wrote the weights and put them back exactly


def test_filter_normalised_directions_match_each_filter(problem):
    R = problem["result"].arrays["random_directions"]
    w = problem["w"].numpy()
    for r in R:  # each Linear weight here is one filter (a row): its direction has the weight's norm
        close(np.linalg.norm(r[:D1]), np.linalg.norm(w[:D1]))
        close(np.linalg.norm(r[D1:]), np.linalg.norm(w[D1:]))


def test_to_dict_is_json_and_scalars(problem):
    d = problem["result"].to_dict()
    json.dumps(d)
    assert set(d["stages"]) == set(STAGES) - {"kfac"}  # "all" leaves out the kfac stage, asked for by name
    assert problem["result"].scalars()["lambda_1"] == d["stages"]["hessian"]["eigenvalues"][0]


def test_resume_reads_every_stage_back(problem, tmp_path):
    X, y = problem["X"], problem["y"]
    model = problem["model"]
    s = lk.AnalyseSettings(top_k=3, tol=1e-10)
    first = lk.analyse(model, half_mse, (X, y), what=["profiles", "trace"], settings=s, quick=True, cache_dir=tmp_path)
    lines = []
    again = lk.analyse(model, half_mse, (X, y), what=["profiles", "trace"], settings=s, quick=True, cache_dir=tmp_path,
                       resume=True, log=lines.append)
    assert set(again.timings_s.values()) == {0.0} and len(lines) == 3  # hessian, trace, profiles
    assert again.stages == first.stages
    close(again.arrays["eigen_profiles"], first.arrays["eigen_profiles"], rtol=0)


def test_kfac_stage_is_exact_where_kfac_is(problem):
    """Each layer's output is the model's one output, whose squared-error Hessian is constant: KFAC and
    EKFAC are the exact block-diagonal GGN, 2 X_l^T X_l / N per layer (mean squared error, twice half_mse),
    and the exact top eigenvalues are those of 2 X^T X / N."""
    X, y = problem["X"], problem["y"]
    settings = lk.AnalyseSettings(top_k=3, tol=1e-12, kfac_loss="mse", density_steps=D1 + D2)
    r = lk.analyse(problem["model"], torch.nn.functional.mse_loss, (X, y), what=["kfac", "trace", "density"],
                   settings=settings).stages["kfac"]
    H = 2 * problem["H"].numpy()
    blocks = np.concatenate([np.linalg.eigvalsh(H[:D1, :D1]), np.linalg.eigvalsh(H[D1:, D1:])])
    top_blocks = np.sort(blocks)[::-1][:3]
    assert r["params"] == ["a.weight", "b.weight"] and r["num_params"] == D1 + D2
    close(r["hessian_top"], np.sort(np.linalg.eigvalsh(H))[::-1][:3], rtol=1e-8)
    close(r["ggn_top"], r["hessian_top"], rtol=1e-8)
    for label in ("kfac", "ekfac"):
        close(r[label]["top"], top_blocks, rtol=1e-10)
        close(r[label]["trace"], np.trace(H), rtol=1e-10)
        assert 0 <= r[label]["density_l1_to_hessian"] <= 2
    with pytest.raises(ValueError, match="set kfac_loss"):  # half the squared error is not the mean squared error
        lk.analyse(problem["model"], half_mse, (X, y), what="kfac", settings=settings)


def test_stage_selection_adds_what_a_stage_needs():
    s = lk.AnalyseSettings()
    assert resolve_stages("overlap", s) == ["hessian", "noise", "overlap"]
    assert resolve_stages(["surface"], s) == ["surface"]
    assert resolve_stages("surface", lk.AnalyseSettings(surface_directions="hessian")) == ["hessian", "surface"]
    assert resolve_stages("landscape", s) == ["hessian", "profiles", "surface"]


@pytest.mark.parametrize("kwargs, match", [
    ({"what": "spectrum"}, "unknown stage 'spectrum'"),
    ({"what": []}, "names no stage"),
    ({"settings": lk.AnalyseSettings(top_k=0)}, "top_k must be an int >= 1"),
    ({"settings": lk.AnalyseSettings(tol=float("nan"))}, "tol must be a finite number"),
    ({"settings": lk.AnalyseSettings(surface_directions="pca")}, "surface_directions must be one of"),
    ({"settings": lk.AnalyseSettings(landscape_method="vmap")}, "landscape_method must be one of"),
    ({"settings": lk.AnalyseSettings(kfac_loss="nll")}, "kfac_loss must be one of"),
    ({"settings": {"top_k": 3}}, "settings must be an AnalyseSettings"),
])
def test_bad_arguments_are_named(problem, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lk.analyse(problem["model"], half_mse, (problem["X"], problem["y"]), **kwargs)


def test_bad_model_data_and_loss_are_named(problem):
    X, y = problem["X"], problem["y"]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lk.analyse(lambda x: x, half_mse, (X, y))
    with pytest.raises(ValueError, match="no samples"):
        lk.analyse(problem["model"], half_mse, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        lk.analyse(problem["model"], lambda o, t: (o - t) ** 2, (X, y), what="trace")
    broken = TwoBlocks().double()
    with torch.no_grad():
        broken.a.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="the loss over the samples is nan"):
        lk.analyse(broken, half_mse, (X, y), what="trace")
