"""The compiled ops, layer 0: ``torch.ops.landscape_kernels.<name>`` with a pure-torch fallback.

- ``schemas.def``: the op schemas, the one table the C++ extension and this package both read;
- ``ops``: loads the extension (or registers the reference), fake kernels, validated wrappers,
  the run-time backend switch;
- ``reference``: the pure-torch reference of every op (fallback and test oracle);
- ``checks``: the argument checks shared by both;
- ``info``: which backends are active.
"""
from . import ops, reference  # importing ops registers the operators
from .info import format_info, info

__all__ = ["ops", "reference", "format_info", "info"]
