"""``analyse``: the noise and curvature report of a user's own model (``docs/analyse.md``): Hessian and
GGN eigenpairs, spectral density, trace, per-layer curvature, gradient noise scale and spectrum, noise
against curvature, loss profiles and a 2-D surface."""
from .runner import ModelAnalysis, analyse  # noqa: F401
from .settings import GROUPS, STAGES, AnalyseSettings  # noqa: F401
