"""The job frame: config options become flags, results are written atomically and reused on resume,
and a new job is its analysis plus its report."""
import argparse
import json
import os
from dataclasses import dataclass, fields

import pytest

from landscape_kernels.cli import JOBS, build_parser, main
from landscape_kernels.reproduce import job as frame
from landscape_kernels.reproduce.job import Job, JobContext, StageResults, option, read_json, write_json


@dataclass
class ToyConfig:
    size: int = option(3, "how many numbers")
    scales: tuple = option((1.0, 2.0), "scale factors")
    name: str = option(None, "an optional name", type=str)
    kind: str = option("a", "a or b", choices=("a", "b"))
    quick: bool = option(False, "fewer numbers")
    hidden: int = 7  # no flag

    def resolved(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        return ToyConfig(1 if self.quick else self.size, self.scales, self.name, self.kind, self.quick, self.hidden)


def write_toy_report(out, summary, arrays):
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"{arrays['note']}: {summary['rows']}\n")


class ToyJob(Job):
    """numbers and their scaled sums"""

    name, config, report = "toy", ToyConfig, write_toy_report

    def compute(self, cfg, ctx):
        with ctx.timer("sums"):
            sums = ctx.stages("sums.json")
            rows = [sums.run(f"scale {s:g}", lambda s=s: {"sum": s * sum(range(cfg.size))}) for s in cfg.scales]
        return {"rows": rows}, {"note": "not in summary.json"}

    def headline(self, summary):
        return f"{len(summary['rows'])} rows"


def test_options_become_flags_and_the_command_line_becomes_the_config():
    parser = argparse.ArgumentParser()
    frame.add_config_arguments(parser, ToyConfig)
    args = parser.parse_args(["--size", "5", "--scales", "0.5,4", "--kind", "b", "--quick"])
    cfg = frame.config_from_args(ToyConfig, args)
    assert (cfg.size, cfg.scales, cfg.name, cfg.kind, cfg.quick, cfg.hidden) == (5, (0.5, 4.0), None, "b", True, 7)
    assert frame.config_from_args(ToyConfig, parser.parse_args([])) == ToyConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--scales", "1,x"])
    assert "--hidden" not in parser.format_help()


def test_the_frame_writes_summary_and_report_and_resumes(tmp_path, capsys):
    toy = ToyJob()
    s = toy.run(ToyConfig(size=4), str(tmp_path), log=print)
    assert s["rows"] == [{"sum": 6.0}, {"sum": 12.0}] and s["config"]["size"] == 4 and s["library_version"]
    assert "sums" in s["timings_s"] and s["seconds"] >= 0
    assert read_json(tmp_path / "summary.json")["rows"] == s["rows"]
    assert (tmp_path / "report.md").read_text().startswith("not in summary.json")
    assert "note" not in read_json(tmp_path / "summary.json")
    capsys.readouterr()
    toy.run(ToyConfig(size=4), str(tmp_path), resume=True, log=print)
    assert capsys.readouterr().out.count("done before, reusing it") == 2
    toy.run(ToyConfig(size=4), str(tmp_path), resume=False, log=print)
    assert "done before" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"size \(--size\) must be finite and positive, got 0"):
        toy.run(ToyConfig(size=0), str(tmp_path / "bad"))


def test_reuse_reads_back_a_finished_result_only_when_resuming(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "a" / "result.json"
    assert JobContext(str(tmp_path)).reuse(str(path), compute) == {"value": 1}
    assert JobContext(str(tmp_path), resume=True, log=lambda *a: None).reuse(str(path), compute) == {"value": 1}
    assert JobContext(str(tmp_path)).reuse(str(path), compute) == {"value": 2}  # not resuming: computed again


def test_results_are_never_half_written(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Unserialisable()})
    assert json.loads(path.read_text()) == {"a": 1}  # the earlier file is intact
    stages = StageResults(str(tmp_path / "s.json"), resume=False, log=print)
    stages.run("x", lambda: [1, 2])
    assert read_json(tmp_path / "s.json") == {"x": [1, 2]}


def test_a_damaged_result_file_is_one_clear_error_naming_it(tmp_path, capsys):
    out = tmp_path / "er"
    out.mkdir()
    (out / "parts.json").write_text('{"stationary": {"rows": [')  # e.g. edited by hand, or a full disk
    code = main(["reproduce", "escape-rate", "--quick", "--parts", "linear", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "parts.json: not a readable result file" in err and "remove it" in err


def test_every_job_has_its_config_flags_and_the_common_ones():
    parser = build_parser()
    assert ToyJob().help == "numbers and their scaled sums"
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    for name, job in JOBS.items():
        assert job.help and job.name == name
        assert os.path.isfile(os.path.join(root, "docs", "reproductions", f"{job.docs or name}.md")), name
        text = parser.parse_args(["reproduce", name]).__dict__
        for f in fields(job.config):
            if "cli" in f.metadata:
                assert f.name in text, (name, f.name)
        assert {"out", "resume", "no_progress"} <= set(text) and text["out"] == os.path.join("runs", name)


def test_a_bad_comma_list_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "nsgd", "--gammas", "0.1,x"])
    assert "comma list of float" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    "variance-flatness --dataset mnist --data-dir D --batch-size 25 --lr 0.2 --window 100 --max-epochs 5 --pcs-every 3 "
    "--center mean --gamma-max-pc 50 --device cpu --seed 1 --out O --quick --resume --no-progress --grid "
    "--grid-batch-sizes 25,50 --grid-lrs 0.1",
    "forgetting --dataset digits --data-dir D --batch-size 10 --lr 0.1 --task1-epochs 2 --task2-epochs 2 "
    "--num-constraints 3 --lam 1 --seed 0 --out O --quick",
    "noise-curvature --dataset digits --data-dir D --per-class 10 --batch-size 5 --lr 0.1 --epochs 2 --clip 1 "
    "--losses ce,mse --seeds 0,1 --top 5 --out O --quick --resume --no-progress",
    "escape-rate --parts linear,noise --dataset digits --data-dir D --stationary-lrs 0.1 --stationary-batch-sizes 1,2 "
    "--passage-dims 1 --passage-thresholds 1.1,1.2 --passage-datasets 2 --noise-epochs 3 --decoupling-epochs 0,2 "
    "--spectrum-samples 50 --seed 0 --out O --quick --resume --no-progress",
    "sharpest-directions --dataset digits --data-dir D --model mlp --epochs 1 --train-samples 100 --subset 50 --k 2 "
    "--seed 0 --lrs 0.1,0.2 --lr-grid-batch-size 16 --batch-sizes 8,16 --batch-grid-lr 0.1 --measure-examples 100 "
    "--dense-epochs 1 --step-analyses 1 --out O --quick --resume --no-progress",
    "nsgd --dataset digits --data-dir D --model mlp --epochs 1 --train-samples 100 --subset 50 --k 2 --seed 0 "
    "--lr 0.1 --batch-size 16 --gammas 0.5,1 --out O --quick --resume --no-progress",
])
def test_the_flags_of_earlier_versions_still_parse(argv):
    build_parser().parse_args(["reproduce"] + argv.split())
