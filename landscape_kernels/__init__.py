"""landscape_kernels: fused kernels for SGD gradient noise and loss-landscape curvature.

Public API (small and explicit):
    PerSampleGradients   per-sample gradient statistics of a model from one backward pass
    ops                  the compiled ops (torch.ops.landscape_kernels.<name>) with validation
    reference            the pure-torch reference of every op
    lanczos_eigs         extreme eigenpairs of a symmetric operator (block Lanczos, full reorthogonalisation)
    spectral_density     stochastic Lanczos quadrature, all probes advanced together
    hutchinson_trace, hutchpp_trace, frobenius_norm   randomised estimators with standard errors
    HessianOperator, GGNOperator, NoiseCovarianceOperator, FisherOperator   matrix-free operators
    TrajectoryRecorder   weight snapshots along training, in memory or a crash-safe store on disk
    open_sharded_trajectory   per-rank stores of parameter-sharded snapshots, read as one trajectory
    StreamingPCA         trajectory PCA (exact / gram / sketch), scikit-learn's attribute names
    loss_profiles, flatness   batched loss along directions; SPEC §1.3 flatness
    SharpnessTracker     top-K Hessian eigenpairs along training, warm-started (SPEC §2.1-2.2)
    NSGD                 Nudged SGD, the step along the top-K subspace scaled by gamma (SPEC §2.4)
    info()               which backends are active

Modules for whole analyses (imported on use): ``data`` (MNIST, digits, subsets, download), ``models``
(the papers' networks), ``training`` (SGDTrainer, StoppingRule), ``callbacks`` (WindowRecorder,
EpochStates), ``analyses.variance_flatness`` / ``analyses.forgetting`` (SPEC §1), ``analyses.sharpest`` (the
decomposed step and cross-sections of SPEC §2.2), ``sharpness`` and ``optim`` (SPEC §2), ``pipelines``
(the ``landscape-kernels reproduce`` jobs), ``report`` (figures and report.md).
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402  (ops registers the operators)
from ._info import info  # noqa: E402
from .lanczos import EigenResult, SpectralDensity, lanczos_eigs, spectral_density  # noqa: E402
from .optim import NSGD  # noqa: E402
from .operators import FisherOperator, GGNOperator, HessianOperator, NoiseCovarianceOperator  # noqa: E402
from .pca import StreamingPCA  # noqa: E402
from .persample import PerSampleGradients  # noqa: E402
from .profiles import FlatnessResult, flatness, loss_profiles  # noqa: E402
from .sharpness import SharpnessTracker  # noqa: E402
from .traces import frobenius_norm, hutchinson_trace, hutchpp_trace  # noqa: E402
from .trajectory import TrajectoryRecorder, open_trajectory  # noqa: E402
from .sharded_trajectory import open_sharded_trajectory  # noqa: E402

__all__ = ["PerSampleGradients", "lanczos_eigs", "EigenResult", "spectral_density", "SpectralDensity",
           "hutchinson_trace", "hutchpp_trace", "frobenius_norm", "HessianOperator", "GGNOperator",
           "NoiseCovarianceOperator", "FisherOperator", "TrajectoryRecorder", "open_trajectory", "open_sharded_trajectory", "StreamingPCA",
           "loss_profiles", "flatness", "FlatnessResult", "SharpnessTracker", "NSGD", "ops", "reference", "info", "__version__"]
