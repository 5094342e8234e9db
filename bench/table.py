"""Render a bench/results JSON as the markdown table quoted in the README.

    python bench/table.py bench/results/persample_cpu.json
"""
import json
import sys


def render(path):
    report = json.load(open(path))
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
