"""One source of truth for the op schemas: the table schemas.def, which the C++ extension compiles in and
the Python package reads; every op in it is registered with exactly that schema and has a reference and
a validated wrapper (its fake kernel is checked by opcheck in test_ops and test_profile_op)."""
import os
import re

import pytest
import torch

from landscape_kernels.kernels import ops, reference

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_table_lists_every_op_once():
    assert len(ops.SCHEMAS) == 12 and "per_sample_gram" in ops.SCHEMAS and "lanczos_reorth" in ops.SCHEMAS
    with open(ops.SCHEMA_TABLE) as f:
        lines = [line for line in f if line.startswith("LK_OP(")]
    assert len(lines) == len(ops.SCHEMAS)


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_each_op_is_registered_with_the_table_schema(name):
    registered = getattr(torch.ops.landscape_kernels, name).default._schema
    assert str(registered) == f"landscape_kernels::{name}{ops.SCHEMAS[name]}"
    assert callable(getattr(reference, name)) and callable(getattr(ops, name))


def test_the_cpp_sources_define_no_schema_of_their_own():
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        source = f.read()
    assert '#include "schemas.def"' in source
    assert not re.search(r'm\.def\("', source), "csrc/ops.cpp spells out a schema: add it to schemas.def instead"


def test_a_damaged_table_is_a_clear_error(tmp_path):
    path = tmp_path / "schemas.def"
    path.write_text("// nothing here\n")
    with pytest.raises(RuntimeError, match="no LK_OP"):
        ops.read_schemas(str(path))
