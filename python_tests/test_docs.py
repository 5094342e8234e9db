"""The README's usage examples run as written."""
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("marker", ["readme-example", "readme-example-operators", "readme-example-lanczos",
                                    "readme-example-trajectory", "readme-example-sharpness"])
def test_readme_example_runs(marker):
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- " + marker + r" -->\s*```python\n(.*?)```", text, re.S)
    assert block, f"README lost its example {marker}"
    exec(compile(block.group(1), "README.md", "exec"), {})
