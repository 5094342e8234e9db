"""Render bench/results JSON files as markdown: one file's tables, or the whole of docs/benchmarks.md.

    python bench/table.py bench/results/persample_cpu.json    # one result file's tables
    python bench/table.py --docs docs/benchmarks.md            # regenerate the benchmarks page
    python bench/table.py --check docs/benchmarks.md           # fail if the page is not what the results give
"""
import argparse
import json
import os
import sys


def _topk_tables(topk):
    lines = []
    for k, rows in topk.items():
        lines += [f"**top-{k} Hessian eigenvalues**", "",
                  "| method | x ours | tolerance used | Hessian-vector products | max rel. error |", "|---|---:|---:|---:|---:|"]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | — | — | — | {r['error'][:80]} |")
            else:
                extra = f" (reorthogonalisation {100 * r['reorth_share']:.1f} % of the time)" if "reorth_share" in r else ""
                missed = " (target missed)" if r.get("target_missed") else ""
                tol = f"{r['tol']:.0e}" if "tol" in r else "—"
                lines.append(f"| {name}{extra} | {r['x_ours']:.2f} | {tol} | {r['products']} | {r['max_rel_err']:.1e}{missed} |")
        lines.append("")
    return lines


def render_lanczos(report):
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"{report['model']}; {report['samples']} MNIST images; {report['params']:,} parameters; median of "
             f"{report.get('topk_repeats', report['repeats'])} runs (top-k; {report['repeats']} for the rest). `x ours` = time / landscape_kernels; error = max relative error of the "
             "eigenvalues against the tol-1e-12 reference. Each method runs at the loosest tolerance of "
             f"{report.get('tol_ladder', '—')} that reaches {report.get('target_rel_err', '—')} relative error.", ""]
    lines += _topk_tables(report["topk"])
    if "cnn" in report:
        c = report["cnn"]
        lines += [f"*Larger model:* {c['model']}; {c['samples']} MNIST images; {c['params']:,} parameters; PyHessian "
                  f"capped at {c.get('pyhessian_max_iter', 1000)} power iterations per eigenvalue (its default is 100).", ""]
        lines += _topk_tables(c["topk"])
    s, h = report["slq"], report["hutchinson"]

    def ratio(other, ours):
        return f"{other['s'] / ours:.2f}" if "s" in other else other.get("error", "n/a")

    lines.append(f"Spectral density, {s['probes']} probes × {s['steps']} steps: PyHessian `density` / ours = "
                 f"{ratio(s['pyhessian'], s['batched_s'])}; batched chains vs the same chains one after another: "
                 f"{s['sequential_s'] / s['batched_s']:.2f}× ({s['pyhessian'].get('note', '')}).  ")
    if "default_operator" in s:
        d = s["default_operator"]
        lines.append(f"With the gradient graph rebuilt per product (`keep_graph=False`, the default before 2026-12-08) batched chains are "
                     f"{d['sequential_s'] / d['batched_s']:.2f}× faster; the first-layer GEMM shared by {s['probes']} "
                     f"columns is only {s['gemm_bound']:.2f}× faster per column on this CPU, which bounds what batching "
                     "can save here.  ")
    lines.append(f"Hutchinson trace, {h['probes']} probes: PyHessian / ours = {ratio(h['pyhessian'], h['ours']['s'])}, "
                 f"curvlinops / ours = {ratio(h['curvlinops'], h['ours']['s'])}.")
    return "\n".join(lines)


def _mib(b):
    return f"{b / 2**20:.0f} MiB" if b is not None else "—"


def _pca_table(methods, extra_header=""):
    lines = ["| method | x ours | peak added | max rel. error, variances | top-10 variances | top-10 subspace angle |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in methods.items():
        if "error" in r:
            lines.append(f"| {name} | — | — | {r['error'][:80]} | | |")
            continue
        lines.append(f"| {name} | {r['x_ours']:.2f} | {_mib(r['peak_added_bytes'])} | {r['max_rel_err_var_all']:.1e} | "
                     f"{r['max_rel_err_var_top10']:.1e} | {r['max_angle_top10']:.1e} |")
    return lines + [""]


def render_pca(report):
    f = report["feng_tu"]
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"median of {report['repeats']} runs. `x ours` = time / landscape_kernels; errors against a float64 "
             "reference on the same float32 snapshots; peak = resident memory added during the fit.", "",
             f"**Feng–Tu scale**: T = {f['T']:,} snapshots × N = {f['N']:,}, all components; ours streams chunks of "
             f"{f['chunk']:,} (`mode=\"exact\"`), the others get the whole matrix.", ""]
    lines += _pca_table(f["methods"])
    if "float32_profile" in f:
        pr, m = f["float32_profile"], f["methods"]
        ours32 = m['landscape_kernels precision="float32"']["s"]
        sk = m.get("scikit-learn PCA (covariance_eigh, float32)", {})
        bound = (f"; scikit-learn's float32 `covariance_eigh` does the same two steps in {sk['s']:.2f} s, so with these two steps at the speed measured here "
                 f"the ratio to it cannot exceed {sk['s'] / (pr['streaming_s'] + pr['eigh_s']):.2f}×") if "s" in sk else ""
        lines += [f"Profile of `precision=\"float32\"` ({ours32:.2f} s in the table): streaming the chunks (centring, "
                  f"one syrk each) {pr['streaming_s']:.2f} s, the eigendecomposition of the {f['N']:,}² scatter "
                  f"{pr['eigh_s']:.2f} s (its eigenvalues alone {pr['eigenvalues_only_s']:.2f} s){bound}.", ""]
    if "large" in report:
        g = report["large"]
        ours = g["methods"]["landscape_kernels"]
        lines += [f"**Large**: T = {g['T']:,} × N = {g['N']:,}, k = {g['k']}, streamed in chunks of {g['chunk']} "
                  f"(ours: `mode=\"sketch\"`, l = {g['sketch_size']}; stated error bound "
                  f"{ours['sketch_error_bound_rel_min_var']:.2f} of the {g['k']}-th variance). Memory bound "
                  f"2(k + l)N float32 = {_mib(g['bound_bytes'])}, plus the input chunk ({_mib(g['input_chunk_bytes'])}).", ""]
        lines += _pca_table(g["methods"])
    if report.get("notes"):
        lines += [f"Note: {report['notes']}", ""]
    return "\n".join(lines)


def render_profiles(report):
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"{report['model']}; {report['samples']:,} MNIST images; only `{report['layer']}` moving; "
             f"{report['directions']} directions × {report['points_per_direction']} points; median of "
             f"{report['repeats']} runs.", "",
             "| method | x ours | points run | max abs. difference vs the loop |", "|---|---:|---:|---:|"]
    for name, r in report["methods"].items():
        note = f" (time scaled from {r['scaled_from_points']} points)" if r.get("scaled_from_points") else ""
        diff = f"{r['max_abs_diff_vs_loop']:.1e}" if "max_abs_diff_vs_loop" in r else "—"
        lines.append(f"| {name}{note} | {r['x_ours']:.2f} | {r['points']:,} | {diff} |")
    fl = report["flatness"]
    ours = report["methods"]["landscape_kernels (one-layer fast path)"]["s"]
    lines += ["", f"`flatness` of the {fl['directions']} directions (the search of Feng & Tu 2021, both sides) took "
              f"{fl['s'] / ours:.2f}× the time of the profiles."]
    return "\n".join(lines)


def _measured(report):
    return f"Measured {report['date']} on {report['device']} ({report['threads']} thread(s), torch {report['torch']})"


def render_noise_curvature(report):
    r = report["results"]
    sm = r["second_moment"]
    lines = [f"{_measured(report)}; {report['samples']:,} MNIST images, float64, median of {report['repeats']}.", "",
             "| measurement | ours | alternative | ratio |", "|---|---:|---:|---:|"]
    alternatives = [("per-sample weighted-sum kernel", "gradients_fused"), ("loop over minibatches", "gradients_loop"),
                    ("`torch.func` vmap(grad) + segment sum", "gradients_vmap")]
    ours = r["gradients_factored"]["s"]
    lines.append("| minibatch gradients of one pass (factored: per-sample factors + one batched GEMM) | "
                 f"{ours:.2f} s | " + " / ".join(f"{label} {r[k]['s']:.2f} s" for label, k in alternatives) + " | "
                 + " / ".join(f"{r[k]['x_factored']:.1f}x" for _, k in alternatives) + " |")
    lines.append(f"| C_ii in every eigen-direction of H from those gradients (C never formed) | "
                 f"{r['c_diag_from_gradients_s']:.2f} s | v_i^T C v_i through C | same numbers to "
                 f"{max(r[k]['max_rel_diff_c_ii_vs_factored'] for _, k in alternatives):.0e} |")
    lines.append(f"| E_p[h_p^2] by the Kronecker identity | {sm['kronecker_all_s']:.1f} s for all {sm['samples']:,} "
                 f"samples | `torch.func` vmap(hessian): {sm['vmap_s']:.1f} s for {sm['vmap_samples']} samples | "
                 f"**{sm['x_kronecker_per_sample']:,.0f}x per sample** |")
    return "\n".join(lines)


def render_scale(report):
    r = report["results"]
    lines = [f"{_measured(report)}; `models.gpt`, {report['parameters']:,} parameters, 16 sequences of 128 tokens, "
             "float32, tol 1e-3; each top-5 method in its own process (peak memory added).", "",
             "| method | time | Hessian-vector products | peak memory added |", "|---|---:|---:|---:|"]
    for name, row in r.items():
        if name.startswith("top5"):
            lines.append(f"| {name[5:]} | {row['s']:.0f} s | {row['products']} | {row['peak_mib'] / 1024:.1f} GB |")
    gram, vmap_gram = r.get("gram ours"), r.get("gram torch.func vmap(grad)")
    if gram and vmap_gram:
        lines += ["", f"Per-sample Gram matrix (16 x 16): ours {gram['s']:.2f} s, +{gram['peak_mib']:.0f} MiB; "
                  f"`torch.func` vmap(grad) {vmap_gram['s']:.2f} s, +{vmap_gram['peak_mib']:.0f} MiB."]
    if "scaling" in r:
        sc = r["scaling"]
        lines += ["", f"Data-parallel: one block of 5 Hessian-vector products {sc['one_rank_s']:.1f} s on 1 rank, "
                  f"{sc['two_ranks_s']:.1f} s on 2 gloo ranks ({sc['threads_per_rank']} thread each): "
                  f"**{sc['speedup']:.2f}x**."]
    if report.get("notes"):
        lines += ["", f"Note: {report['notes']}"]
    return "\n".join(lines)


def render_scale_memory(report):
    lines = [f"{_measured(report)}; {report['parameters']:,} parameters; each step in its own process, peak "
             "resident memory added.", "", "| step | time | peak memory added |", "|---|---:|---:|"]
    for name, row in report["results"].items():
        lines.append(f"| {name.removeprefix('memory ')} | {row['s']:.1f} s | {row['peak_mib']:.0f} MB |")
    return "\n".join(lines)


def render_sharpness(report):
    every = "at every epoch start" if report["every_steps"] is None else f"every {report['every_steps']} steps"
    lines = [f"{_measured(report)}; {report['model']}, {report['train_samples']:,} training images, top-{report['k']} "
             f"on {report['hessian_samples']} images at tol {report['tol']:g}, measured {every} after "
             f"{report['warmup_epochs']} warm-up epochs.", "",
             "| method | time | Hessian-vector products | time / warm start |", "|---|---:|---:|---:|"]
    for name, row in report["summary"].items():
        lines.append(f"| {name} | {row['s']:.1f} s | {row['products']} | {row['x_warm']:.2f} |")
    return "\n".join(lines)


def render_variance_flatness(report):
    t = report["timings_s"]
    lines = [f"{_measured(report)}; `reproduce variance-flatness` on {report['dataset']} at the paper's setting, "
             f"{report['epochs']} epochs ({report['steps']:,} steps, stopped by {report['stopped_by']}), test accuracy "
             f"{report['test_accuracy']:.4f}.", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    lines += [f"| **total** | **{report['total_s']:.0f}** |"]
    return "\n".join(lines)


def _method_rows(rows, absolute, time_cell, cells, errors_span):
    """Table rows, one per method: its name, its time where absolute times are shown, ``cells(row)``; a
    method that failed shows its error over ``errors_span`` columns."""
    lines = []
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} |" + (" — |" if absolute else "") + " — |" * (errors_span - 1) + f" {r['error'][:90]} |")
        else:
            lines.append(f"| {name} |" + (f" {time_cell(r)} |" if absolute else "") + "".join(f" {c} |" for c in cells(r)))
    return lines


def render_real_models(report):
    absolute = not report["device"].startswith("CPU")
    lines = [f"{_measured(report)}; {report['model']}, {report['parameters']:,} parameters, "
             f"{report['batch'][0]} sequences of {report['batch'][1]} tokens, float32. `x ours` = time / landscape_kernels; "
             "peak = memory added by one call, each method in a fresh process.", "",
             f"**Per-sample norms + Gram + variance** (median of {report['repeats']} interleaved rounds; error: relative "
             "to `torch.func`)", "",
             "| method |" + (" time |" if absolute else "") + " x ours | peak added | rel. err norms / Gram / variance |",
             "|---|" + ("---:|" if absolute else "") + "---:|---:|---|"]

    def errors(r):
        return " / ".join(f"{r['rel_err'][k]:.0e}" for k in ("sq_norms", "gram", "variance")) if "rel_err" in r else "—"

    lines += _method_rows(report["per_sample"], absolute, lambda r: f"{r['s'] * 1e3:.0f} ms",
                          lambda r: [f"{r['x_ours']:.2f}", _mib(r.get("peak_added_bytes")), errors(r)], 3)
    if "top5" in report:
        lines += ["", "**Top-5 Hessian eigenvalues**, tol 1e-3 (difference: the largest relative difference of the five "
                  "eigenvalues to ours)", "",
                  "| method |" + (" time |" if absolute else "") + " x ours | Hessian-vector products | peak added | difference |",
                  "|---|" + ("---:|" if absolute else "") + "---:|---:|---:|---:|"]
        lines += _method_rows(report["top5"], absolute, lambda r: f"{r['s']:.1f} s",
                              lambda r: [f"{r['x_ours']:.2f}", r["products"], _mib(r["peak_added_bytes"]),
                                         f"{r['max_rel_diff_to_ours']:.0e}"], 4)
    if report.get("notes"):
        lines += ["", f"Note: {report['notes']}"]
    return "\n".join(lines)


# file stem (without the device suffix) -> renderer
def render_analyse(report):
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"median of {report['repeats']} runs; ratios = PyHessian (or the loop) time / ours.", "",
             "| model | measurement | ours | PyHessian | x ours |", "|---|---|---|---|---:|"]

    def cell(r, key):
        return r["error"][:60] if "error" in r else f"{key}: {r[key]:.2g}"

    for name, c in report["cases"].items():
        tk, tr, de = c["topk"], c["trace"], c["density"]
        label = f"{name} ({c['params']:,} weights, {c['samples']:,} samples)"
        for what, ours, theirs, key in ((f"top-{tk['k']} eigenvalues, tol 1e-3", tk["ours"], tk["pyhessian"], "max_rel_err"),
                                        ("trace, 99 products", tr["ours"], tr["pyhessian"], "abs_err"),
                                        (f"density, {de['probes']} probes x {de['steps']} steps", de["ours"], de["pyhessian"], None)):
            ratio = f"{theirs['s'] / ours['s']:.2f}" if "s" in theirs else "—"
            o = cell(ours, key) if key else ""
            t = cell(theirs, key) if key and "error" not in theirs else theirs.get("error", "")[:60]
            lines.append(f"| {label} | {what} | {o} | {t} | {ratio} |")
        cs, sf = c["curvature_stage"], c["surface"]
        total = f"{cs['pyhessian_s'] / cs['ours_s']:.2f}" if cs["pyhessian_s"] else "—"
        lines.append(f"| {label} | all three | | | **{total}** |")
        lines.append(f"| {label} | 2-D surface, {sf['points']} points: the batched engine vs a point-by-point loop | | "
                     f"max abs. diff {sf['max_abs_diff']:.1e} | {sf['loop_s'] / sf['batched_s']:.2f} |")
        if "stage_auto_s" in sf:
            lines.append(f"| {label} | the analyse surface stage (auto chose {sf['stage_method']}) vs the loop | | | "
                         f"{sf['loop_s'] / sf['stage_auto_s']:.2f} |")
    trace_errs = [f"{n}: ours ± {c['trace']['ours']['stderr']:.2g}, PyHessian ± {c['trace']['pyhessian'].get('stderr', float('nan')):.2g}"
                  for n, c in report["cases"].items()]
    lines += ["", "Trace standard errors at 99 products (`abs_err` is the distance from a 2,000-probe Hutchinson "
              "reference): " + "; ".join(trace_errs) + ". PyHessian's density ran on a `torch.eig` shim "
              "(`torch.linalg.eigh`)."]
    return "\n".join(lines)


def render_approximations(report):
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"median of {report['repeats']} interleaved rounds. `x ours` = time / landscape_kernels; error = relative "
             "L2 distance to ours (for the estimates: to the exact GGN diagonal); peak = memory added during one call.", ""]
    for name, m in report["models"].items():
        lines += [f"**{name}** — {m['parameters']:,} parameters, batch {tuple(m['batch'])}", "",
                  "| quantity | method | x ours | peak added | rel. error |", "|---|---|---:|---:|---:|"]
        for quantity, methods in m["quantities"].items():
            ours = next((r["median_s"] for k, r in methods.items() if k.startswith("landscape_kernels") and "median_s" in r),
                        None)
            for method, r in methods.items():
                if "error" in r:
                    lines.append(f"| {quantity} | {method} | — | — | {r['error'][:70]} |")
                    continue
                ratio = f"{r['median_s'] / ours:.2f}" if ours else "—"
                peak = f"{r['peak_added_bytes'] / 2**20:.1f} MiB" if r.get("peak_added_bytes") is not None else "—"
                err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
                lines.append(f"| {quantity} | {method} | {ratio} | {peak} | {err} |")
        lines.append("")
    return "\n".join(lines)


def render_products(report):
    lines = [_measured(report) + f"; top-k and SLQ: median of {report['repeats']} run(s), single products: median of "
             f"{max(report['repeats'], 3)}. Product times in training steps (forward + backward of the same loss on the "
             "same samples): the physical ratio.", ""]
    for name, c in report["cases"].items():
        lines += [f"**{name}** — {c['params']:,} parameters", "",
                  "| Hessian-vector product | steps per product | steps per column, 8 columns per call |", "|---|---:|---:|"]
        for route, r in c["products"].items():
            if "error" in r:
                lines.append(f"| {route} | — | {r['error'][:80]} |")
                continue
            cols = f"{r['per_column_of_8_x_step']:.2f}" if "per_column_of_8_x_step" in r else "—"
            lines.append(f"| {route} | {r['per_product_x_step']:.2f} | {cols} |")
        t, s = c["topk"], c["slq"]
        o, e = t["ours"], t["double-backward eigsh"]
        inside = (1 - o["outside_products_share"]) * o["s"] / o["products"] / c["step_s"]
        lines += ["", f"Top-{t['k']} eigenvalues at tol {t['tol']:g}: ours {o['products']} products of {inside:.2f} steps "
                  f"each inside the solver, {100 * o['outside_products_share']:.0f} % of the time outside products; "
                  f"double-backward `eigsh` {e['products']} products, {e['s'] / e['products'] / c['step_s']:.2f} steps per "
                  f"product with ARPACK's own work, {e['x_ours']:.2f}× our time (eigenvalues within {e['max_rel_diff']:.0e}). "
                  + (f"Ours stopping on the eigenvalues' error estimates (`criterion=\"eigenvalue\"` at tol "
                     f"{t['ours, eigenvalue criterion']['tol']:g}, no true-residual "
                     f"products): {t['ours, eigenvalue criterion']['products']} products, `eigsh` "
                     f"{e['x_ours_eigenvalue_criterion']:.2f}× its time (eigenvalues within "
                     f"{t['ours, eigenvalue criterion']['max_rel_diff']:.0e} of the verified ones). "
                     if "ours, eigenvalue criterion" in t else "") +
                  f"SLQ, {s['probes']} probes × {s['steps']} steps: one block of probes {s['x_batched']:.2f}× faster "
                  "than the same probes one by one.", ""]
    return "\n".join(lines)


RENDERERS = {"analyse": render_analyse, "approximations": render_approximations, "lanczos": render_lanczos, "pca": render_pca, "products": render_products, "profiles": render_profiles,
             "noise_curvature": render_noise_curvature, "scale": render_scale, "scale_memory": render_scale_memory,
             "sharpness": render_sharpness, "sharpness_every4": render_sharpness,
             "variance_flatness": render_variance_flatness, "real_models": render_real_models}


def _stem(path):
    name = os.path.basename(path)[: -len(".json")]
    return name.rsplit("_", 1)[0]  # persample_cpu -> persample


def render(path):
    report = json.load(open(path))
    if _stem(path) in RENDERERS:
        return RENDERERS[_stem(path)](report)
    # On the shared CPU machines only ratios from one run mean something; absolute times only on a GPU.
    absolute = not report["device"].startswith("CPU")
    lines = [f"Measured {report['date']} on {report['device']} ({report['threads']} threads, torch {report['torch']}); "
             f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up. "
             "`x floor` = time / plain backward; `x ours` = time / landscape_kernels (compiled); "
             "peak = memory added during one call.", ""]
    for name, case in report["cases"].items():
        lines.append(f"**{name}** — B = {case['batch']}, {case['params']:,} parameters "
                     f"(B × P float32 = {case['per_sample_gradient_bytes'] / 2**20:.0f} MiB)")
        lines.append("")
        lines.append("| method |" + (" median |" if absolute else "") + " x floor | x ours | peak added | max rel. err vs vmap |")
        lines.append("|---|" + ("---:|" if absolute else "") + "---:|---:|---:|---:|")
        for mname, e in case["methods"].items():
            if "error" in e:
                lines.append(f"| {mname} |" + (" — |" if absolute else "") + f" — | — | — | {e['error'][:80]} |")
                continue
            unit = f" {e['median_s'] * 1e3:.2f} ms |" if absolute else ""
            lines.append(f"| {mname} |{unit} {e.get('x_plain_backward', float('nan')):.2f} | "
                         f"{e.get('x_landscape_kernels', float('nan')):.2f} | {e['peak_added_bytes'] / 2**20:.1f} MiB | "
                         f"{e.get('max_rel_err_vs_vmap', 0):.1e} |")
        lines.append("")
        if "profile" in case:
            p = case["profile"]
            lines += [f"Profile of ours: the recording forward + backward takes {p['capture_x_floor']:.2f}× the plain "
                      f"backward, the statistics {p['stats_x_floor']:.2f}× more: {p['stats_in_weight_gemms']:.1f} times "
                      f"the blocks' weight-gradient GEMMs (the plain backward is {p['floor_in_weight_gemms']:.1f}).", ""]
    if report.get("notes"):
        lines += [f"Note: {report['notes']}", ""]
    return "\n".join(lines)


# the page's sections: (title, script, result files, what it measures)
SECTIONS = [
    ("Per-sample gradient statistics", "persample.py", ["persample"],
     "Squared norms, Gram matrix and variance of every parameter's per-sample gradients from one forward and "
     "backward, against `torch.func` vmap(grad), BackPACK and Opacus; the plain backward is the floor."),
    ("Curvature: top-k Hessian eigenvalues, spectral density, traces", "lanczos.py", ["lanczos"],
     "Every method at the accuracy the comparison asks for, on the same model and data: PyHessian, "
     "hessian-eigenthings, curvlinops + scipy `eigsh`, a double-backward HVP in `eigsh`."),
    ("Hessian products on a CNN and a transformer", "products.py", ["products"],
     "Where the product is not one GEMM: each route's Hessian-vector product in training steps, 8 columns per call "
     "against one, top-k eigenvalues against double-backward `eigsh` with the share of time outside products, "
     "and SLQ probes in one block against one by one, on the SimpleCNN and a GPT."),
    ("analyse: the curvature stage and the surface", "analyse.py", ["analyse"],
     "The curvature stage of `landscape-kernels analyse` (top-5 eigenvalues, Hutch++ trace, SLQ density) against "
     "PyHessian's `eigenvalues` + `trace` + `density` on the same model and samples, and the 2-D surface through the "
     "batched loss-profile engine and as the analyse stage runs it (timing both ways, keeping the faster) against a "
     "loop over points."),
    ("Sharpest-direction tracking along training", "sharpness.py", ["sharpness", "sharpness_every4"],
     "Warm-started Lanczos (from the previous measurement's eigenvectors) against a cold start and scipy `eigsh` "
     "(the released code's solver)."),
    ("Curvature approximations: diagonals, KFAC, EKFAC", "approximations.py", ["approximations"],
     "Exact GGN and Fisher diagonals against BackPACK, Hutchinson and XDiag against curvlinops, KFAC (type-2) "
     "against curvlinops and BackPACK's KFLR, EKFAC against curvlinops, on an MLP, the SimpleCNN and a tiny GPT-2."),
    ("Trajectory PCA", "pca.py", ["pca"],
     "`StreamingPCA` (float64, and `precision=\"float32\"`) against scikit-learn's PCA (full SVD and "
     "`covariance_eigh`, its fastest solver for T ≫ N, each in float64 and float32), IncrementalPCA and "
     "`torch.pca_lowrank`."),
    ("Loss profiles", "profiles.py", ["profiles"],
     "`loss_profiles` with one layer moving against a point-by-point loop; `flatness` timed on the same directions."),
    ("Noise against curvature", "noise_curvature.py", ["noise_curvature"],
     "The measurement of Zhang, Yang & Tu (2026) on the 2,500 weights of W2: minibatch gradients, C_ii in H's "
     "eigenbasis, E_p[h_p^2]."),
    ("Transformer scale", "scale.py", ["scale", "scale_memory"],
     "An 11.5M-parameter GPT-style model: top-5 Hessian eigenvalues against hessian-eigenthings and curvlinops + "
     "`eigsh`, the per-sample Gram matrix against `torch.func`, the memory of an analysis step against a training "
     "step, and 1 against 2 gloo ranks."),
    ("A transformers model", "real_models.py", ["real_models"],
     "A GPT-2 from transformers (Conv1D projections, tied embeddings, position ids shared by the batch): per-sample "
     "norms, Gram and variance against Opacus and `torch.func`; top-5 Hessian eigenvalues against curvlinops + "
     "`eigsh` and hessian-eigenthings."),
    ("The main job", "variance_flatness.py", ["variance_flatness"],
     "`landscape-kernels reproduce variance-flatness` on MNIST at the paper's setting, stage by stage."),
]


def render_docs(results_dir):
    """The whole of docs/benchmarks.md from the result files in ``results_dir``."""
    files = sorted(f for f in os.listdir(results_dir) if f.endswith(".json"))
    lines = ["# Benchmarks", "",
             "<!-- generated by `python bench/table.py --docs docs/benchmarks.md` from bench/results/*.json: "
             "edit the scripts or the results, not this page -->", "",
             "Each script in `bench/` checks that every method agrees before timing, times medians of repeats in one "
             "process and records the peak memory each method adds; the comparison libraries are optional "
             "(`bench/README.md` says how to install them). On the shared CPU machine only ratios measured in one run "
             "mean something; absolute times only from a GPU. **No GPU result has been recorded yet**: every number "
             "below is from a 2-vCPU CPU.", ""]
    used = set()
    for title, script, stems, what in SECTIONS:
        mine = [f for f in files if _stem(f) in stems]
        if not mine:
            continue
        lines += [f"## {title}", "", f"`python bench/{script}` — {what}", ""]
        for f in mine:
            used.add(f)
            lines += [f"`bench/results/{f}`:", "", render(os.path.join(results_dir, f)).rstrip(), ""]
    rest = [f for f in files if f not in used]
    if rest:
        raise SystemExit(f"bench/table.py: no section of the benchmarks page takes {rest}; add one to SECTIONS")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", nargs="?", help="one result file to render")
    parser.add_argument("--docs", help="write the benchmarks page here")
    parser.add_argument("--check", help="exit 1 when this benchmarks page differs from what the results give")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.result:
        print(render(args.result))
        return 0
    page = render_docs(args.results)
    if args.docs:
        with open(args.docs, "w") as f:
            f.write(page)
        return 0
    if args.check:
        with open(args.check) as f:
            if f.read() != page:
                print(f"{args.check} is out of date: run python bench/table.py --docs {args.check}", file=sys.stderr)
                return 1
        return 0
    parser.error("give a result file, --docs PATH or --check PATH")


if __name__ == "__main__":
    sys.exit(main())
