import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's name (fresh but reproducible inputs)."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _hypothesis_profiles():
    """Property-test budgets (docs/reliability.md): ``ci`` (the default) a bounded, derandomised set of
    examples per test, the same every run; ``thorough`` (``HYPOTHESIS_PROFILE=thorough``) many more,
    freshly random. Neither keeps an example database in the checkout."""
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **common)
    settings.register_profile("thorough", max_examples=500, print_blob=True, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
