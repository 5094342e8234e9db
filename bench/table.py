"""Render a bench/results JSON as the markdown table quoted in the README.

    python bench/table.py bench/results/persample_cpu.json
"""
import json
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
        lines.append(f"With the default operator (gradient graph rebuilt per product) batched chains are "
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
    if "large" in report:
        g = report["large"]
        ours = g["methods"]["landscape_kernels"]
        lines += [f"**Large**: T = {g['T']:,} × N = {g['N']:,}, k = {g['k']}, streamed in chunks of {g['chunk']} "
                  f"(ours: `mode=\"sketch\"`, l = {g['sketch_size']}; stated error bound "
                  f"{ours['sketch_error_bound_rel_min_var']:.2f} of the {g['k']}-th variance). Memory bound "
                  f"2(k + l)N float32 = {_mib(g['bound_bytes'])}, plus the input chunk ({_mib(g['input_chunk_bytes'])}).", ""]
        lines += _pca_table(g["methods"])
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
    lines += ["", f"`flatness` of the {fl['directions']} directions (Feng & Tu 2021 search on both sides) took "
              f"{fl['s'] / ours:.2f}× the time of the profiles."]
    return "\n".join(lines)


RENDERERS = {"lanczos": render_lanczos, "pca": render_pca, "profiles": render_profiles}


def render(path):
    report = json.load(open(path))
    if report.get("benchmark") in RENDERERS:
        return RENDERERS[report["benchmark"]](report)
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
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))
