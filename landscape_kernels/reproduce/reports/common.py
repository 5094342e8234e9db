"""What every reproduce report shares: figures (PNG, matplotlib's Agg backend), number formatting, the
claims table and the closing of ``report.md``.

matplotlib is in the ``report`` extra; without it the report is written with its tables and a line
saying that the figures were skipped, so an analysis never fails for want of a plotting library.
"""
import math
import os


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def fmt(v):
    """A number for a table: 4 significant digits, "∞" and "—" (None)."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:.4g}"
    return str(v)


def draw_figures(draw, out, s):
    """(plt, written): pyplot (None without matplotlib) and the figure files ``draw(plt, out, s, written)``
    saved (nothing is drawn without matplotlib; the report says so)."""
    plt, written = pyplot(), []
    if plt is not None:
        draw(plt, out, s, written)
    return plt, written


def save_figure(plt, fig, out, name, written):
    """Save ``fig`` as OUT/name, close it and add the name to ``written``."""
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    written.append(name)


def checks_table(checks):
    """The paper's claims as a markdown table: claim, the numbers it rests on, whether it holds."""
    lines = ["| claim | measured | holds |", "|---|---|---|"]
    for c in checks:
        vals = ", ".join(f"{k}: {fmt(v) if not isinstance(v, list) else ' / '.join(fmt(t) for t in v)}"
                         for k, v in c["values"].items())
        note = f" ({c['caveat']})" if c.get("caveat") else ""
        lines.append(f"| {c['claim']} | {vals}{note} | {'yes' if c['holds'] else '**no**'} |")
    return lines


def figure_lines(written, plt):
    """Markdown image lines of the figures, or the line saying why there are none."""
    if plt is None:
        return ["(figures skipped: matplotlib is not installed; `pip install landscape_kernels[report]`)", ""]
    return [f"![{name}]({name})" for name in written] + [""]


def write_report(out, lines, s, draw, footer=None):
    """Draw the figures (``draw(plt, out, s, written)``, skipped without matplotlib), close the report's
    ``lines`` with them and ``footer`` (default: the total time, ``s["seconds"]``) and write OUT/report.md.
    Returns the figure files written."""
    plt, written = draw_figures(draw, out, s)
    if footer is None:
        footer = [f"Total time {s['seconds']:.0f} s; landscape_kernels {s['library_version']}.", ""]
    lines = lines + ["", "## Figures", ""] + figure_lines(written, plt) + footer
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return written
