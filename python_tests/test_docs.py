"""The documentation as a user meets it: every Python example in README.md and docs/ runs as written,
every `landscape-kernels` command shown parses, every relative link points at a file, the README stays
short, and docs/benchmarks.md is what bench/results/ gives."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from landscape_kernels.cli import build_parser

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                          recursive=True)
                               if "figures" not in p)


def _blocks(page, language):
    text = open(os.path.join(ROOT, page)).read()
    return [m.group(1) for m in re.finditer(r"```" + language + r"\n(.*?)```", text, re.S)]


EXAMPLES = [pytest.param(page, i, block, id=f"{page}:{i}") for page in PAGES
            for i, block in enumerate(_blocks(page, "python"))]


def test_there_are_examples_for_every_engine():
    pages = {page for page, _, _ in (p.values for p in EXAMPLES)}
    assert {"README.md", "docs/guide/per-sample.md", "docs/guide/curvature.md", "docs/guide/trajectories.md",
            "docs/guide/distributed.md", "docs/guide/training.md"} <= pages
    assert len(_blocks("README.md", "python")) == 4  # one short example per engine


@pytest.mark.parametrize("page,index,block", EXAMPLES)
def test_python_example_runs(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(block, f"{page} (example {index})", "exec"), {"__name__": "__docs__"})


COMMANDS = [pytest.param(page, line, id=f"{page}: {line[:60]}") for page in PAGES for block in _blocks(page, "bash")
            for line in block.splitlines() if "landscape-kernels " in line]


@pytest.mark.parametrize("page,line", COMMANDS)
def test_shown_commands_parse(page, line):
    command = line.split("landscape-kernels ", 1)[1].split("#")[0]
    build_parser().parse_args(shlex.split(command))


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)):
                broken.append(f"{page} -> {target}")
    assert not broken, broken


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        assert "shared/" not in text and "SPEC" not in text, page


def test_the_readme_stays_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 12 * 1024


def test_the_benchmarks_page_is_generated_from_the_results():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "table.py"), "--check",
                           os.path.join(ROOT, "docs", "benchmarks.md")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
