"""Writing benchmark results: atomically (a temporary file renamed into place, the library's own
writer), so an interrupted run never leaves a truncated JSON behind."""
import json
import os

from landscape_kernels.reproduce.job import write_json as write_json_atomically


def write_json(path, report):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomically(path, report)


def base_parser(doc, data_dir=False):
    """The options every benchmark shares: --quick, --json PATH and, for MNIST, --data-dir."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if data_dir:
        parser.add_argument("--data-dir", default=None, help="ROOT holding MNIST/raw in torchvision's layout "
                            "(default $LANDSCAPE_KERNELS_DATA or ~/.cache/landscape_kernels)")
    parser.add_argument("--quick", action="store_true", help="one repeat per method")
    parser.add_argument("--json", help="write the results here")
    return parser


def keep_earlier_parts(path, report, keys):
    """Copy the parts ``keys`` of the earlier results at ``path`` (a run that skipped them) into
    ``report``, with the date each was measured (``kept_from``, carried over repeated skips), a note
    saying so, and the earlier run's own notes (``kept_notes``), which are about those parts."""
    if not path or not os.path.exists(path):
        return report
    with open(path) as f:
        earlier = json.load(f)
    kept = [k for k in keys if k in earlier and k not in report]
    if not kept:
        return report
    for k in kept:
        report[k] = earlier[k]
        report.setdefault("kept_from", {})[k] = earlier.get("kept_from", {}).get(k, earlier["date"])
    report["kept_notes"] = earlier.get("kept_notes") if "kept_from" in earlier else earlier.get("notes")
    said = " ".join(f"The {k} part is from the run of {report['kept_from'][k]} (this run skipped it)." for k in kept)
    report["notes"] = " ".join(n for n in (report.get("notes"), said, report["kept_notes"]) if n)
    return report
