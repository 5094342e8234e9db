"""Every ``reproduce`` job's bad settings on the command line: exit code 2 and one line naming the flag and
what it expects, no traceback, before any work starts. The table is built from the jobs' configs, so a
new numeric option is covered the day it is added."""
import json
import math
from dataclasses import fields

import pytest
import torch

from landscape_kernels.cli import JOBS, main
from landscape_kernels.reproduce.job import JOB_FILE, flag_name


def numeric_options(job):
    """(field, minimum, is_float, is_list) for every numeric flag of ``job``'s config."""
    for f in fields(job.config):
        spec = f.metadata.get("cli")
        if spec is None or spec["choices"] is not None or f.default is False:
            continue
        sample = f.default[0] if isinstance(f.default, tuple) and f.default else f.default
        kind = spec["type"] or type(sample)
        if kind in (int, float):
            yield f.name, spec["minimum"], kind is float, isinstance(f.default, tuple)


def bad_values(minimum, is_float, is_list):
    """Out-of-bound values: below the bound, and NaN / inf for floats; as a list, one bad value after a good one."""
    below = "-1" if minimum == 0 else "0" if minimum is None else repr(minimum - 1)
    values = [below] + (["nan", "inf"] if is_float else [])
    return [f"1,{v}" for v in values] if is_list else values


CASES = [(name, field, value) for name, job in JOBS.items() for field, *rest in numeric_options(job)
         for value in bad_values(*rest)]


def one_clear_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("landscape-kernels: error: "), err
    return err


def test_the_table_covers_every_job():
    assert {name for name, _, _ in CASES} == set(JOBS)
    assert len(CASES) >= 60  # every job has several numeric settings


@pytest.mark.parametrize("job, field, value", CASES, ids=[f"{n}-{f}={v}" for n, f, v in CASES])
def test_a_bad_numeric_setting_is_one_line_naming_the_flag(job, field, value, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["reproduce", job, f"{flag_name(field)}={value}", "--out", str(out), "--no-progress"])
    err = one_clear_line(capsys)
    assert code == 2 and f"{field} ({flag_name(field)}) must be finite and" in err, err
    assert not out.exists()  # refused before the report folder is made


def run_job(argv, capsys):
    code = main(["reproduce"] + argv + ["--no-progress"])
    return code, one_clear_line(capsys)


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "report.md"
    path.write_text("mine")
    code, err = run_job(["variance-flatness", "--quick", "--out", str(path)], capsys)
    assert code == 2 and "is a file; expected a folder" in err and path.read_text() == "mine"


@pytest.mark.parametrize("seconds", ["-1", "nan"])
def test_checkpoint_every_out_of_bounds_is_refused(seconds, tmp_path, capsys):
    code, err = run_job(["variance-flatness", "--quick", "--checkpoint-every", seconds, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "checkpoint_seconds (--checkpoint-every) must be >= 0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    code, err = run_job(["variance-flatness", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--device" in err and "no CUDA GPU" in err


def test_device_that_is_not_a_device_is_refused(tmp_path, capsys):
    code, err = run_job(["variance-flatness", "--quick", "--device", "gpu0", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "device (--device) must be a torch device" in err


def test_resume_of_another_jobs_folder_is_refused(tmp_path, capsys):
    (tmp_path / JOB_FILE).write_text(json.dumps({"job": "forgetting", "config": {}}))
    code, err = run_job(["variance-flatness", "--quick", "--out", str(tmp_path), "--resume"], capsys)
    assert code == 2 and "holds a run of the job 'forgetting'" in err


@pytest.mark.parametrize("flag, earlier, now", [("seed", 7, 3), ("max_epochs", 50, 5)])
def test_resume_with_other_settings_names_the_changed_flags(flag, earlier, now, tmp_path, capsys):
    # e.g. a smaller --max-epochs on resume would report a run that is not the one trained
    config = {f.name: f.default for f in fields(JOBS["variance-flatness"].config)}
    (tmp_path / JOB_FILE).write_text(json.dumps({"job": "variance-flatness", "config": {**config, flag: earlier}}))
    code, err = run_job(["variance-flatness", "--out", str(tmp_path), "--resume", flag_name(flag), str(now)], capsys)
    assert code == 2 and f"{flag_name(flag)} {earlier} -> {now}" in err and "run with other settings" in err


def test_a_damaged_job_manifest_is_named(tmp_path, capsys):
    (tmp_path / JOB_FILE).write_text('{"job": "variance')
    code, err = run_job(["variance-flatness", "--quick", "--out", str(tmp_path), "--resume"], capsys)
    assert code == 2 and JOB_FILE in err


def test_bad_values_helper_is_out_of_bounds():
    # the table's values really are outside each option's bound (guards the table itself)
    for minimum, is_float in ((None, False), (None, True), (0, False), (0, True), (2, False)):
        for v in bad_values(minimum, is_float, False):
            x = float(v)
            assert not math.isfinite(x) or (x <= 0 if minimum is None else x < minimum)
