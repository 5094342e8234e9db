"""landscape_kernels: fused kernels for SGD gradient noise and loss-landscape curvature.

The package is layered; each subpackage imports only from the ones listed before it
(``docs/architecture.md``):

    kernels     the compiled ops (torch.ops.landscape_kernels.<name>), their reference and checks
    capture     per-sample gradient capture (PerSampleGradients, layer rules); model/data plumbing
    operators   Hessian, GGN, noise covariance, Fisher, data-parallel operators
    linalg      Lanczos eigenpairs, spectral density, traces, loss profiles, flatness
    trajectory  trajectory recorder and stores, sharded stores, streaming PCA
    training    SGD trainer, callbacks, NSGD, sharpness tracking, datasets, models
    analyses    one module per published analysis
    reproduce   the ``landscape-kernels reproduce`` jobs and their reports
    cli         the ``landscape-kernels`` command

The names below are the public API; everything else is reached through its subpackage.
"""
from .version import __version__  # noqa: F401

from .kernels import ops, reference  # noqa: E402  (importing ops registers the operators)
from .kernels.info import info  # noqa: E402
from .capture.distributed import distributed_gram, distributed_moments  # noqa: E402
from .capture.persample import PerSampleGradients  # noqa: E402
from .capture.rules import Call, Factors, register_per_sample_rule  # noqa: E402
from .operators.base import DenseOperator  # noqa: E402
from .operators.distributed import DistributedOperator  # noqa: E402
from .operators.ggn import GGNOperator  # noqa: E402
from .operators.hessian import HessianOperator  # noqa: E402
from .operators.noise import FisherOperator, NoiseCovarianceOperator  # noqa: E402
from .operators.diagonal import fisher_diagonal, ggn_diagonal, noise_diagonal  # noqa: E402
from .operators.kfac import EKFACOperator, KFACOperator, kfac_parameters  # noqa: E402
from .linalg.density import SpectralDensity, spectral_density  # noqa: E402
from .linalg.profiles import FlatnessResult, flatness, loss_profiles  # noqa: E402
from .linalg.lanczos import EigenResult, lanczos_eigs  # noqa: E402
from .linalg.traces import frobenius_norm, hutchinson_trace, hutchpp_trace  # noqa: E402
from .linalg.diagonal import DiagonalEstimate, hutchinson_diagonal, xdiag_diagonal  # noqa: E402
from .trajectory.distributed import rank_trajectory_store, sharded_pca  # noqa: E402
from .trajectory.pca import StreamingPCA  # noqa: E402
from .trajectory.recorder import TrajectoryRecorder  # noqa: E402
from .trajectory.sharded import open_sharded_trajectory  # noqa: E402
from .trajectory.store import open_trajectory  # noqa: E402
from .training.optim import NSGD  # noqa: E402
from .training.sharpness import SharpnessTracker  # noqa: E402
from .analyses.analyse import AnalyseSettings, ModelAnalysis, analyse  # noqa: E402

__all__ = ["KFACOperator", "EKFACOperator", "kfac_parameters", "fisher_diagonal", "noise_diagonal", "ggn_diagonal",
           "hutchinson_diagonal", "xdiag_diagonal", "DiagonalEstimate", "PerSampleGradients", "register_per_sample_rule", "Factors", "Call", "lanczos_eigs", "EigenResult", "spectral_density", "SpectralDensity",
           "hutchinson_trace", "hutchpp_trace", "frobenius_norm", "HessianOperator", "GGNOperator",
           "NoiseCovarianceOperator", "FisherOperator", "DenseOperator", "DistributedOperator",
           "distributed_moments", "distributed_gram", "sharded_pca", "rank_trajectory_store",
           "TrajectoryRecorder", "open_trajectory", "open_sharded_trajectory", "StreamingPCA",
           "loss_profiles", "flatness", "FlatnessResult", "SharpnessTracker", "NSGD", "analyse", "AnalyseSettings",
           "ModelAnalysis", "ops", "reference", "info",
           "__version__"]
