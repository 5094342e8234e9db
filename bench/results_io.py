"""Writing benchmark results: atomically (a temporary file renamed into place), so an interrupted run
never leaves a truncated JSON behind."""
import json
import os


def write_json(path, report):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
