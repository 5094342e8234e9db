"""The report of ``landscape-kernels analyse``: a table of every number with its uncertainty and what
it means, the per-layer table, the stage timings, and the figures (spectral density on a log scale,
gradient-norm histogram, loss profiles, the 2-D surface, noise against curvature, curves along
training)."""
import math

import numpy as np

from .common import fmt, save_figure, write_report


def pm(value, err):
    """"value ± err" (the error to 2 significant digits), or the value alone."""
    if err is None or (isinstance(err, float) and math.isnan(err)):
        return fmt(value)
    return f"{fmt(value)} ± {float(err):.2g}"


def _rows(s):
    st, rows = s["stages"], []
    if "hessian" in st:
        h = st["hessian"]
        rows.append(("Hessian λ_1 … λ_k", ", ".join(fmt(v) for v in h["eigenvalues"]),
                     f"sharpest curvatures; largest relative residual {max(h['relative_residuals']):.1g}"
                     f"{'' if h['converged'] else ' (**not converged**)'}; plain GD diverges beyond lr 2/λ_1 = "
                     f"{fmt(2 / h['eigenvalues'][0]) if h['eigenvalues'][0] > 0 else '∞'}"))
    if "ggn" in st:
        g = st["ggn"]
        rows.append(("GGN λ_1 … λ_k", ", ".join(fmt(v) for v in g["eigenvalues"]),
                     "the positive semi-definite Gauss-Newton part; close to the Hessian's when the residual term is small"))
    if "trace" in st:
        t = st["trace"]
        rows.append(("tr H (Hutch++)", pm(t["trace"], t["trace_stderr"]), f"total curvature over {s['num_params']} weights"))
        rows.append(("‖H‖_F", pm(t["frobenius"], t["frobenius_stderr"]), "root of the sum of squared eigenvalues"))
    if "density" in st:
        d = st["density"]
        rows.append(("negative-curvature share", pm(*d["negative_curvature_share"]),
                     "Σ|λ| over λ < −σ / Σ|λ| from the spectral density (σ its resolution); near 0 at a minimum, larger at a saddle"))
        rows.append(("mass at λ < −σ", pm(*d["negative_mass"]),
                     f"fraction of eigenvalues below −σ = {fmt(-d['sigma'])} (SLQ)"))
        rows.append(("λ_min (SLQ)", fmt(d["lambda_min"]), "the most negative curvature the density reaches"))
    if "noise" in st:
        n = st["noise"]
        rows.append(("B_simple = tr Σ / |G|²", pm(n["b_simple"], n["b_simple_stderr"]),
                     "gradient noise scale (McCandlish et al. 2018): batches well below it are noise-dominated; "
                     "the critical batch size is about this"))
        rows.append(("|G|², tr Σ", f"{fmt(n['signal_sq_norm'])}, {fmt(n['noise_trace'])}",
                     "squared full-batch gradient and per-sample noise trace (unbiased)"))
        q = n["norm_quantiles"]
        rows.append(("per-sample ‖g‖ median [5 %, 95 %]", f"{fmt(q['0.5'])} [{fmt(q['0.05'])}, {fmt(q['0.95'])}]",
                     "spread of per-sample gradient norms; a long tail = a few samples dominate the noise"))
        sp = n["spectrum"]
        rows.append(("noise λ_1 … λ_k (C_1)", ", ".join(fmt(v) for v in sp["eigenvalues"]),
                     f"top of the per-sample covariance; they carry {fmt(sp['top_share'])} of tr C_1"))
    if "overlap" in st:
        o = st["overlap"]
        rows.append(("noise–Hessian subspace overlap", fmt(o["subspace_overlap"]),
                     f"(1/k)‖V_Hᵀ V_C‖²_F of the top-k subspaces; random subspaces give {o['random_overlap']:.1g}"))
        if o["gamma"]:
            g = o["gamma"]
            rows.append(("γ in C_ii ∝ H_ii^γ", pm(g["exponent"], g["stderr"]),
                         f"over the top {o['gamma_points']} Hessian directions (95 % CI {fmt(g['ci95'][0])}–"
                         f"{fmt(g['ci95'][1])}); 1 = noise proportional to curvature, > 1 superlinear"))
    if "profiles" in st:
        p = st["profiles"]
        if p["random_rise"]:
            rows.append(("loss rise at ±1 filter-normalised step", ", ".join(fmt(v) for v in p["random_rise"]),
                         "Li et al. 2018's flatness along random directions (smaller = flatter)"))
    if "kfac" in st:
        rows += _approximation_rows(st["kfac"])
    if "surface" in st:
        sf = st["surface"]
        rows.append(("2-D surface min / max", f"{fmt(sf['min'])} / {fmt(sf['max'])}",
                     f"over ±{fmt(sf['axis_range'])} along two {sf['directions']} directions; centre {fmt(sf['loss'])}"))
    return rows


def _approximation_rows(a):
    """KFAC's and EKFAC's top eigenvalues against the exact Hessian's and GGN's over the layers they cover."""
    rows = [("exact λ_1 … λ_k over KFAC's layers", "H: " + ", ".join(fmt(v) for v in a["hessian_top"]) + "; GGN: "
             + ", ".join(fmt(v) for v in a["ggn_top"]), f"{a['num_params']} weights of {len(a['params'])} parameters "
             f"(Linear / Conv / Conv1D), {a['loss']}")]
    for label in ("kfac", "ekfac"):
        e = a[label]
        extra = []
        if "trace_ratio_to_hessian" in e:
            extra.append(f"tr ratio to H {fmt(e['trace_ratio_to_hessian'])}")
        if "density_l1_to_hessian" in e:
            extra.append(f"L1 distance of its density to H's {fmt(e['density_l1_to_hessian'])} (0 same, 2 disjoint)")
        rows.append((f"{label.upper()} λ_1 … λ_k / exact", ", ".join(fmt(v) for v in e["top"]) + " / GGN ratio "
                     + ", ".join(fmt(v) for v in e["ratio_to_ggn"]),
                     "ratio to the Hessian's " + ", ".join(fmt(v) for v in e["ratio_to_hessian"])
                     + (("; " + "; ".join(extra)) if extra else "") + f"; {e['seconds']:.2g} s"))
    return rows


def _layer_lines(s):
    st = s["stages"]
    curv = {r["layer"]: r for r in st.get("layers", {}).get("layers", [])}
    snr = {r["layer"]: r for r in st.get("noise", {}).get("layers", [])}
    names = list(curv) or list(snr)
    if not names:
        return []
    lines = ["", "## Per layer", "",
             "The top eigenvalue of each layer's diagonal block of the Hessian (the other layers fixed) and the "
             "per-sample signal-to-noise |G_l|² / tr Σ_l (a batch of B has B times it).", "",
             "| layer | weights | top eigenvalue | residual | SNR |", "|---|---|---|---|---|"]
    for name in names:
        c, n = curv.get(name, {}), snr.get(name, {})
        lines.append(f"| {name} | {c.get('size', '—')} | {fmt(c.get('top_eigenvalue'))} | "
                     f"{fmt(c.get('residual'))} | {fmt(n.get('snr'))} |")
    return lines


def _series_lines(s):
    if not s.get("series"):
        return []
    keys = [k for k in s["series"][0] if k != "checkpoint"]
    lines = ["", "## Along training", "", "| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in s["series"]:
        lines.append(f"| {row['checkpoint']} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    return lines


def _draw(arrays):
    def draw(plt, out, s, written):
        st = s["stages"]
        if "density_grid" in arrays:
            fig, ax = plt.subplots(figsize=(5, 3.4))
            ax.semilogy(arrays["density_grid"], np.maximum(arrays["density"], 1e-12))
            ax.set(xlabel="eigenvalue", ylabel="density", title="Hessian spectral density (SLQ)")
            ax.set_ylim(bottom=max(1e-8, float(np.max(arrays["density"])) * 1e-8))
            save_figure(plt, fig, out, "density.png", written)
        if "gradient_norms" in arrays:
            fig, ax = plt.subplots(figsize=(5, 3.4))
            ax.hist(arrays["gradient_norms"], bins=min(50, max(10, len(arrays["gradient_norms"]) // 5)))
            ax.set(xlabel="per-sample gradient norm ‖g_n‖", ylabel="samples", title="Per-sample gradient norms")
            save_figure(plt, fig, out, "gradient_norms.png", written)
        if "eigen_profiles" in arrays:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
            lam = st["hessian"]["eigenvalues"]
            for i, prof in enumerate(arrays["eigen_profiles"]):
                axes[0].plot(arrays["eigen_deltas"], prof, label=f"v_{i + 1} (λ {lam[i]:.3g})")
            axes[0].set(xlabel="offset δ along the unit eigenvector", ylabel="loss", title="Along top Hessian eigenvectors")
            axes[0].legend(fontsize=7)
            for i, prof in enumerate(arrays.get("random_profiles", [])):
                axes[1].plot(arrays["random_deltas"], prof, label=f"random {i + 1}")
            axes[1].set(xlabel="filter-normalised step", ylabel="loss", title="Along random directions (Li et al.)")
            if len(arrays.get("random_profiles", [])):
                axes[1].legend(fontsize=7)
            save_figure(plt, fig, out, "profiles.png", written)
        if "surface" in arrays:
            fig, ax = plt.subplots(figsize=(4.6, 4))
            a = arrays["surface_axis"]
            cs = ax.contour(a, a, arrays["surface"].T, levels=20)
            ax.clabel(cs, fontsize=6)
            ax.plot([0], [0], "k+")
            names = ("v_1", "v_2") if st["surface"]["directions"] == "hessian" else ("random 1", "random 2")
            ax.set(xlabel=names[0], ylabel=names[1], title="Loss surface")
            save_figure(plt, fig, out, "surface.png", written)
        if "overlap" in st:
            o = st["overlap"]
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
            im = axes[0].imshow(arrays["overlap_matrix"], vmin=0, vmax=1, cmap="viridis")
            fig.colorbar(im, ax=axes[0])
            axes[0].set(xlabel="noise eigenvector j", ylabel="Hessian eigenvector i", title="cos² (v_i^H, v_j^C)")
            H, C = np.array(o["H_ii"]), np.array(o["C_ii"])
            keep = (H > 0) & (C > 0)
            axes[1].loglog(H[keep], C[keep], "o")
            if o["gamma"]:
                x = np.array([H[keep].min(), H[keep].max()])
                axes[1].loglog(x, np.exp(o["gamma"]["log_prefactor"]) * x ** o["gamma"]["exponent"], "--",
                               label=f"γ = {o['gamma']['exponent']:.2f}")
                axes[1].legend()
            axes[1].set(xlabel="H_ii = λ_i", ylabel="C_ii = v_iᵀ C_1 v_i", title="Noise against curvature")
            save_figure(plt, fig, out, "noise_curvature.png", written)
        if st.get("layers"):
            rows = st["layers"]["layers"]
            fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * len(rows) + 1)))
            ax.barh([r["layer"] for r in rows][::-1], [max(r["top_eigenvalue"], 1e-30) for r in rows][::-1])
            ax.set_xscale("log")
            ax.set(xlabel="top eigenvalue of the layer's Hessian block", title="Curvature per layer")
            ax.tick_params(axis="y", labelsize=6)
            save_figure(plt, fig, out, "layers.png", written)
        if s.get("series") and len(s["series"]) > 1:
            keys = [k for k in s["series"][0] if k != "checkpoint"]
            cols = 3
            rows = -(-len(keys) // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows), squeeze=False)
            x = np.arange(len(s["series"]))
            for ax, key in zip(axes.flat, keys):
                ax.plot(x, [r.get(key, np.nan) for r in s["series"]], "o-")
                ax.set_title(key, fontsize=9)
                ax.set_xticks(x, [r["checkpoint"] for r in s["series"]], rotation=45, fontsize=6)
            for ax in list(axes.flat)[len(keys):]:
                ax.axis("off")
            save_figure(plt, fig, out, "training_curves.png", written)

    return draw


def write_analyse_report(out, s, arrays):
    cfg = s["config"]
    lines = ["# Noise and curvature report", "",
             f"Model: {s['model']}" + (f", checkpoint {s['checkpoint']}" if s.get("checkpoint") else "")
             + (f", {len(s['checkpoints'])} checkpoints (the table is the last; curves below)" if s.get("checkpoints") else ""),
             f"— {s['num_params']} weights, {s['num_samples']} samples, mean loss {fmt(s['loss'])}, on {cfg['device']}"
             f"{', ' + cfg['dtype'] if cfg.get('dtype') else ''}"
             f"{f', shared by {ranks} torchrun processes' if (ranks := s.get('ranks', 1)) > 1 else ''}. Every number is over these samples; "
             "what each one is: docs/analyse.md.", "",
             "| quantity | value | what it says |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(s)]
    lines += _layer_lines(s) + _series_lines(s)
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s.get("timings_s", {}).items()]
    lines += _method_lines(s["stages"])
    write_report(out, lines, s, _draw(arrays))


def _method_lines(stages):
    """How the profiles and the surface evaluated their points, with what auto measured."""
    out = []
    for stage in ("profiles", "surface"):
        st = stages.get(stage)
        if not st or "method" not in st:
            continue
        timed = st.get("seconds_per_point")
        measured = (f" (timed per point: batched {timed['batched'] * 1e3:.3g} ms, loop {timed['loop'] * 1e3:.3g} ms)"
                    if timed and len(timed) == 2 else "")
        out.append(f"Points of the {stage}: {'one by one (loop)' if st['method'] == 'loop' else 'batched'}{measured}.")
    return [""] + out if out else []
