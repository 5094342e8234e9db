"""Algorithms on any operator, layer 3: eigenpairs, spectral density, traces, loss profiles, flatness.

- ``lanczos``: block Lanczos with full reorthogonalisation (``lanczos_eigs``);
- ``density``: stochastic Lanczos quadrature (``spectral_density``);
- ``traces``: Hutchinson, Hutch++ and the Frobenius norm, with standard errors;
- ``diagonal``: Hutchinson and XDiag estimates of an operator's diagonal, with standard errors;
- ``profiles``: the loss along directions (``loss_profiles``, ``LossEvaluator``) and the flatness, where
  it reaches e times its value at the centre (``flatness``).
"""
from .density import SpectralDensity, spectral_density
from .diagonal import DiagonalEstimate, hutchinson_diagonal, xdiag_diagonal
from .lanczos import EigenResult, LanczosNotConverged, lanczos_eigs
from .profiles import FlatnessResult, LossEvaluator, flatness, loss_profiles
from .traces import frobenius_norm, hutchinson_trace, hutchpp_trace

__all__ = ["hutchinson_diagonal", "xdiag_diagonal", "DiagonalEstimate", "lanczos_eigs", "EigenResult", "LanczosNotConverged", "spectral_density", "SpectralDensity", "hutchinson_trace", "hutchpp_trace", "frobenius_norm", "loss_profiles", "LossEvaluator", "flatness", "FlatnessResult"]
