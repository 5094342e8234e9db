"""Interrupted and resumed ``reproduce`` jobs give the uninterrupted run's summary.json.

Each job runs once uninterrupted (``--quick``, a checkpoint at every epoch end); then again, stopped by
SIGINT (Ctrl-C) or SIGKILL, and continued with ``--resume``. The two summaries must agree in every number
but the timings: integers, strings and flags exactly, floats to 1e-9 relative (a list of floats against its
largest entry). (Two uninterrupted runs
are not always bitwise equal: MKL's threaded BLAS/LAPACK may block a float64 eigendecomposition
differently from one process to the next; measured on noise-curvature, gamma 1.034278968528078 in 7 of
8 runs and 1.0342789685331608 in the 8th, a 5e-12 difference. A resume bug moves results by far more:
the window recorder's off-by-one step moved psi from 5.47 to 5.39.) The signal is sent at one of these
points: "training" (as soon as the first training checkpoint exists: inside the second epoch), or a
fraction of the uninterrupted run's time (an analysis stage, an epoch end, the report, or the
interpreter's exit after the summary is written, where Python's default SIGINT action ends the process
silently: nothing is left to resume there).

CI runs SIGINT during training on every job and SIGKILL during training on one;
``LANDSCAPE_KERNELS_FULL_MATRIX=1 python -m pytest python_tests/robustness/test_interruption.py`` runs
every job x {SIGINT, SIGKILL} x {training, 0.5, 0.9}.
"""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

JOBS = ("variance-flatness", "forgetting", "sharpest-directions", "nsgd", "noise-curvature", "escape-rate")
FULL = os.environ.get("LANDSCAPE_KERNELS_FULL_MATRIX") == "1"


def _cases():
    if FULL:
        return [(j, s, p) for j in JOBS for s in ("SIGINT", "SIGKILL") for p in ("training", 0.5, 0.9)]
    return [(j, "SIGINT", "training") for j in JOBS] + [("variance-flatness", "SIGKILL", "training")]


def _command(job, out, *extra):
    return [sys.executable, "-m", "landscape_kernels.cli", "reproduce", job, "--quick", "--no-progress",
            "--checkpoint-every", "0", "--out", str(out), *extra]


def _run(job, out, *extra, stop=None, signum=None, limit=None):
    """Run the job; with ``stop`` ("training" or seconds), send ``signum`` then (within ``limit``
    seconds). Returns (exit code, stderr, whether the job got as far as its summary, its last write)."""
    proc = subprocess.Popen(_command(job, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop is not None:
        deadline = time.perf_counter() + (stop if stop != "training" else limit)
        while proc.poll() is None and time.perf_counter() < deadline:
            if stop == "training" and list(pathlib.Path(out).glob("**/*checkpoint.pt")):
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err, (pathlib.Path(out) / "summary.json").exists()


def same_result(got, want, path="summary", scale=None):
    """``got`` equals ``want``: every float to 1e-9 relative, everything else exactly (see the docstring).
    A list of numbers is compared norm-wise, against its largest entry: a spectrum's rounding-level tail
    (eigenvalues of 1e-19 next to 0.4) moves with the run's rounding as much as its top does."""
    if isinstance(want, list) and want and all(isinstance(w, float) and math.isfinite(w) for w in want):
        scale = max(abs(w) for w in want)
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            same_result(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            same_result(g, w, f"{path}[{i}]", scale)
    elif isinstance(want, float) and isinstance(got, float):
        size = scale if scale is not None else max(abs(got), abs(want))
        same = got == want or (math.isnan(got) and math.isnan(want)) or abs(got - want) <= 1e-9 * size
        assert same, f"{path}: {got!r} != {want!r}"
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


def comparable(value):
    """The summary without its timings (the only numbers two runs of a job may differ in)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if "seconds" not in k and k != "timings_s"}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    done = {}

    def get(job):
        if job not in done:
            out = tmp_path_factory.mktemp(job)
            t0 = time.perf_counter()
            code, err, _ = _run(job, out)
            assert code == 0, err
            done[job] = (time.perf_counter() - t0, comparable(json.loads((out / "summary.json").read_text())))
        return done[job]

    return get


@pytest.mark.parametrize("job,signame,point", _cases())
def test_an_interrupted_and_resumed_job_equals_the_uninterrupted_one(job, signame, point, uninterrupted, tmp_path):
    seconds, expected = uninterrupted(job)
    signum = getattr(signal, signame)
    stop = point if point == "training" else point * seconds
    code, err, finished = _run(job, tmp_path, stop=stop, signum=signum, limit=seconds)
    if code != 0:  # it was stopped (a fast run may finish first)
        assert code in (-signum, 128 + signum), err
        if signame == "SIGINT" and not finished:
            assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err
    code, err, _ = _run(job, tmp_path, "--resume")
    assert code == 0, err
    same_result(comparable(json.loads((tmp_path / "summary.json").read_text())), expected)
