"""Algorithms on any operator, layer 3: eigenpairs, spectral density, traces, loss profiles, flatness.

- ``lanczos``: block Lanczos with full reorthogonalisation (``lanczos_eigs``);
- ``density``: stochastic Lanczos quadrature (``spectral_density``);
- ``traces``: Hutchinson, Hutch++ and the Frobenius norm, with standard errors;
- ``profiles``: the loss along directions (``loss_profiles``, ``LossEvaluator``) and the flatness, where
  it reaches e times its value at the centre (``flatness``).
"""
from .density import SpectralDensity, spectral_density  # noqa: F401
from .lanczos import EigenResult, LanczosNotConverged, lanczos_eigs  # noqa: F401
from .profiles import FlatnessResult, LossEvaluator, flatness, loss_profiles  # noqa: F401
from .traces import frobenius_norm, hutchinson_trace, hutchpp_trace  # noqa: F401
