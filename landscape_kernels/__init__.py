"""landscape_kernels: fused kernels for SGD gradient noise and loss-landscape curvature.

Public API (small and explicit):
    PerSampleGradients   per-sample gradient statistics of a model from one backward pass
    ops                  the compiled ops (torch.ops.landscape_kernels.<name>) with validation
    reference            the pure-torch reference of every op
    lanczos_eigs         extreme eigenpairs of a symmetric operator (block Lanczos, full reorthogonalisation)
    spectral_density     stochastic Lanczos quadrature, all probes advanced together
    hutchinson_trace, hutchpp_trace, frobenius_norm   randomised estimators with standard errors
    HessianOperator, GGNOperator, NoiseCovarianceOperator, FisherOperator   matrix-free operators
    info()               which backends are active
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402  (ops registers the operators)
from ._info import info  # noqa: E402
from .lanczos import EigenResult, SpectralDensity, lanczos_eigs, spectral_density  # noqa: E402
from .operators import FisherOperator, GGNOperator, HessianOperator, NoiseCovarianceOperator  # noqa: E402
from .persample import PerSampleGradients  # noqa: E402
from .traces import frobenius_norm, hutchinson_trace, hutchpp_trace  # noqa: E402

__all__ = ["PerSampleGradients", "lanczos_eigs", "EigenResult", "spectral_density", "SpectralDensity",
           "hutchinson_trace", "hutchpp_trace", "frobenius_norm", "HessianOperator", "GGNOperator",
           "NoiseCovarianceOperator", "FisherOperator", "ops", "reference", "info", "__version__"]
