"""Trajectory PCA: StreamingPCA against scikit-learn PCA, IncrementalPCA and torch.pca_lowrank.

Two cases on synthetic float32 trajectories (a drift along one dense direction plus a random walk whose
per-coordinate step variance falls as a power law, like SGD weight trajectories):

- Feng–Tu scale (Feng & Tu 2021): T = 12,000 snapshots of N = 2,500 weights, all components. Ours streams
  the snapshots in chunks of 1,000 (``mode="exact"``, float64 and ``precision="float32"``). The others
  get the whole matrix: scikit-learn's full SVD and its ``covariance_eigh`` solver (its fastest for
  T >> N), each in float64 and float32, IncrementalPCA and torch.pca_lowrank.
- Large: N = 1,000,000, T = 1,000, k = 50, streamed in chunks of 100 snapshots (``mode="sketch"``,
  sketch_size l = 100) against IncrementalPCA fed the same chunks and torch.pca_lowrank on the whole
  matrix (which must fit in memory).

Errors are against a float64 reference on the same float32 data (numpy's SVD for the first case, the
eigendecomposition of the float64 Gram matrix for the second). Memory: peak resident memory added
during the fit (Linux), which includes the input chunk a streaming method is handed.

    python bench/pca.py --quick --json bench/results/pca_cpu.json
"""
import os
import sys
import warnings
from datetime import datetime, timezone

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from landscape_kernels.trajectory.pca import StreamingPCA, add_scatter_upper, subspace_angles, symmetric_eigh_upper  # noqa: E402
from results_io import base_parser, keep_earlier_parts, write_json  # noqa: E402
from timing import PeakRSS, timed  # noqa: E402

warnings.filterwarnings("ignore", category=RuntimeWarning)


def trajectory_chunks(T, N, chunk, seed, gamma=1.5, drift=20.0):
    """Yield float32 (t, N) chunks of one deterministic trajectory: x(t) = drift * (t / T) * u + walk(t),
    the walk's coordinate j stepping with variance rank_j^-gamma (ranks a random permutation)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, generator=g)
    u /= u.norm()
    scale = (torch.randperm(N, generator=g).float() + 1) ** (-gamma / 2)
    position = torch.zeros(N)
    for start in range(0, T, chunk):
        rows = min(chunk, T - start)
        walk = torch.randn(rows, N, generator=g).mul_(scale).cumsum_(0).add_(position)
        position = walk[-1].clone()
        yield walk.addr_(torch.arange(start, start + rows, dtype=torch.float32) / T, u, alpha=drift)
        del walk  # before the next chunk is drawn: one chunk alive at a time


def variance_error(var, ref):
    var, ref = np.asarray(var, dtype=np.float64), np.asarray(ref, dtype=np.float64)[: len(var)]
    return float(np.max(np.abs(var - ref) / ref))


def max_angle(components, ref_components, k=10):
    return float(subspace_angles(torch.as_tensor(np.asarray(components[:k])), torch.as_tensor(ref_components[:k])).max())


def run_method(fn, repeats):
    with PeakRSS() as mem:
        (var, comps), seconds = timed(fn, repeats)
    return {"s": seconds, "peak_added_bytes": mem.added, "var": var, "components": comps}


def summarise(rows, ref_var, ref_comps, ours="landscape_kernels"):
    out = {}
    for name, r in rows.items():
        if "error" in r:
            out[name] = r
            continue
        out[name] = {"s": r["s"], "x_ours": r["s"] / rows[ours]["s"], "peak_added_bytes": r["peak_added_bytes"],
                     "max_rel_err_var_all": variance_error(r["var"], ref_var),
                     "max_rel_err_var_top10": variance_error(r["var"][:10], ref_var),
                     "max_angle_top10": max_angle(r["components"], ref_comps), **r.get("extra", {})}
    return out


def print_rows(title, rows):
    print(f"\n{title}\n    {'method':40s} {'x ours':>8s} {'peak MiB':>9s} {'var err (all)':>14s} {'top-10':>9s} {'angle':>9s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"    {name:40s} failed: {r['error'][:80]}")
            continue
        mib = f"{r['peak_added_bytes'] / 2**20:9.0f}" if r["peak_added_bytes"] is not None else "        -"
        print(f"    {name:40s} {r['x_ours']:8.2f} {mib} {r['max_rel_err_var_all']:14.1e} "
              f"{r['max_rel_err_var_top10']:9.1e} {r['max_angle_top10']:9.1e}")


def _optional(fn):
    try:
        return fn()
    except Exception as e:  # a comparison library missing or failing must not stop the benchmark
        return {"error": f"{type(e).__name__}: {e}"}


def feng_tu_case(T, N, repeats):
    X = torch.cat(list(trajectory_chunks(T, N, 1000, seed=0)))
    Xd = X.double().numpy()
    _, s, vt = np.linalg.svd(Xd - Xd.mean(0), full_matrices=False)
    ref_var, ref_comps = s**2 / (T - 1), torch.from_numpy(vt[:10])
    chunks = X.split(1000)

    def ours(precision="float64"):
        pca = StreamingPCA(mode="exact", precision=precision)
        for c in chunks:
            pca.partial_fit(c)
        return pca.explained_variance_.numpy(), pca.components_

    def sklearn_pca(data, solver="full"):
        from sklearn.decomposition import PCA
        pca = PCA(svd_solver=solver).fit(data)
        return pca.explained_variance_, pca.components_

    def sklearn_ipca():
        from sklearn.decomposition import IncrementalPCA
        pca = IncrementalPCA(n_components=N, batch_size=N).fit(Xd)
        return pca.explained_variance_, pca.components_

    def lowrank():
        Xt = torch.from_numpy(Xd)
        _, S, V = torch.pca_lowrank(Xt, q=N, center=True, niter=2)
        return (S**2 / (T - 1)).numpy(), V.T

    X32 = X.numpy()
    rows = {"landscape_kernels": run_method(ours, repeats)}
    rows['landscape_kernels precision="float32"'] = run_method(lambda: ours("float32"), repeats)
    rows["scikit-learn PCA (full SVD, float64)"] = _optional(lambda: run_method(lambda: sklearn_pca(Xd), repeats))
    rows["scikit-learn PCA (full SVD, float32)"] = _optional(lambda: run_method(lambda: sklearn_pca(X32), repeats))
    rows["scikit-learn PCA (covariance_eigh, float64)"] = _optional(
        lambda: run_method(lambda: sklearn_pca(Xd, "covariance_eigh"), repeats))
    rows["scikit-learn PCA (covariance_eigh, float32)"] = _optional(
        lambda: run_method(lambda: sklearn_pca(X32, "covariance_eigh"), repeats))
    rows[f"scikit-learn IncrementalPCA (batch {N}, float64)"] = _optional(lambda: run_method(sklearn_ipca, repeats))
    rows["torch.pca_lowrank (q = N, niter 2, float64)"] = _optional(lambda: run_method(lowrank, repeats))
    return summarise(rows, ref_var, ref_comps), float32_profile(chunks, repeats)


def float32_profile(chunks, repeats):
    """Where ``precision="float32"`` spends its time: streaming the chunks (each centred on its mean, one
    syrk into the scatter) and the eigendecomposition of the N x N scatter, with the eigenvalues alone
    (the reduction to tridiagonal form) beside it. scikit-learn's ``covariance_eigh`` does the same two
    steps (a GEMM of the snapshots and an ``eigh``), so their sum bounds what any ratio to it can reach."""
    import scipy.linalg

    def stream():
        pca = StreamingPCA(mode="exact", precision="float32")
        for c in chunks:
            pca.partial_fit(c)
        return pca

    _, t_stream = timed(stream, repeats)
    scatter = torch.zeros(chunks[0].shape[1], chunks[0].shape[1])  # the same scatter, from the public pieces
    for c in chunks:
        add_scatter_upper(scatter, c - c.double().mean(0).float())
    _, t_eigh = timed(lambda: symmetric_eigh_upper(scatter), repeats)
    _, t_values = timed(lambda: scipy.linalg.eigh(scatter.numpy(), lower=False, eigvals_only=True, driver="evd",
                                                  check_finite=False), repeats)
    return {"streaming_s": t_stream, "eigh_s": t_eigh, "eigenvalues_only_s": t_values}


def gram_reference(X, k, width=16384):
    """Top-k variances and components of the centred (T, N) float32 X from its float64 Gram matrix."""
    T = X.shape[0]
    mean = X.double().mean(0)
    G = torch.zeros(T, T, dtype=torch.float64)
    for c in range(0, X.shape[1], width):
        tile = X[:, c : c + width].double() - mean[c : c + width]
        G += tile @ tile.T
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0)[:k], U.flip(1)[:, :10]
    comps = torch.cat([(U.T @ (X[:, c : c + width].double() - mean[c : c + width])) for c in range(0, X.shape[1], width)], 1)
    return (lam / (T - 1)).numpy(), comps / comps.norm(dim=1, keepdim=True)


def large_case(T, N, k, ell, chunk, repeats):
    stream = lambda: trajectory_chunks(T, N, chunk, seed=1)  # noqa: E731

    def ours():
        pca = StreamingPCA(n_components=k, mode="sketch", sketch_size=ell)
        for c in stream():
            pca.partial_fit(c)
            del c  # the generator draws the next chunk while the loop variable still holds this one
        ours.bound = pca.sketch_error_bound_
        return pca.explained_variance_.numpy(), pca.components_[:10]

    def ipca():
        from sklearn.decomposition import IncrementalPCA
        pca = IncrementalPCA(n_components=k, batch_size=chunk)
        for c in stream():
            pca.partial_fit(c.numpy())
            del c
        return pca.explained_variance_, pca.components_[:10]

    # Streaming methods: the chunk generation happens inside the timed loop; measure it alone and subtract.
    _, gen_s = timed(lambda: sum(float(c[0, 0]) for c in stream()), 1)
    rows = {"landscape_kernels": run_method(ours, repeats)}
    rows["landscape_kernels"]["extra"] = {"sketch_error_bound": ours.bound}
    rows[f"scikit-learn IncrementalPCA (batch {chunk})"] = _optional(lambda: run_method(ipca, repeats))
    for r in rows.values():
        if "s" in r:
            r["s"] -= gen_s
    X = torch.cat(list(stream()))

    def lowrank():
        _, S, V = torch.pca_lowrank(X, q=k + 10, center=True, niter=2)
        return (S[:k].double() ** 2 / (T - 1)).numpy(), V.T[:10]

    rows[f"torch.pca_lowrank (q = {k + 10}, niter 2, whole matrix)"] = _optional(lambda: run_method(lowrank, repeats))
    ref_var, ref_comps = gram_reference(X, k)
    X = None  # free the whole matrix before the summaries
    out = summarise(rows, ref_var, ref_comps)
    out["landscape_kernels"]["sketch_error_bound_rel_min_var"] = ours.bound / float(ref_var[k - 1])
    return out


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--large-n", type=int, default=1_000_000,
                        help="N of the large case (0 skips it, keeping the large case of an earlier --json file)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    report = {"benchmark": "pca", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "CPU",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats}
    T, N = 12_000, 2_500
    methods, profile = feng_tu_case(T, N, repeats)
    report["feng_tu"] = {"T": T, "N": N, "k": N, "chunk": 1000, "methods": methods, "float32_profile": profile}
    print_rows(f"Feng–Tu scale: T = {T} x N = {N}, all components", methods)
    print(f"    precision=\"float32\": streaming {profile['streaming_s']:.2f} s + eigh {profile['eigh_s']:.2f} s "
          f"(eigenvalues alone {profile['eigenvalues_only_s']:.2f} s)")
    if args.large_n:
        T, N, k, ell, chunk = 1000, args.large_n, 50, 100, 100
        methods = large_case(T, N, k, ell, chunk, repeats)
        report["large"] = {"T": T, "N": N, "k": k, "sketch_size": ell, "chunk": chunk, "methods": methods,
                           "bound_bytes": 2 * (k + ell) * N * 4, "input_chunk_bytes": chunk * N * 4}
        print_rows(f"Large: T = {T} x N = {N}, k = {k}, streamed in chunks of {chunk}", methods)
        ours = methods["landscape_kernels"]
        print(f"    sketch error bound: {ours['sketch_error_bound']:.3e} ({ours['sketch_error_bound_rel_min_var']:.1e} of the "
              f"{k}-th variance); memory bound 2(k+l)N floats = {report['large']['bound_bytes'] / 2**20:.0f} MiB "
              f"(+ the {chunk}-snapshot input chunk, {chunk * N * 4 / 2**20:.0f} MiB)")
    else:
        keep_earlier_parts(args.json, report, ["large"])
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
