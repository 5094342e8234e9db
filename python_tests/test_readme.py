"""The README's usage example runs as written."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_readme_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its marked example"
    exec(compile(block.group(1), "README.md", "exec"), {})
