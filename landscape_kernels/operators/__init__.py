"""Matrix-free symmetric operators, layer 2: the curvature and noise of a model's training loss.

- ``base``: ``Operator`` (``matmat``, ``matvec``, ``@``, ``to_scipy``), ``DenseOperator``, ``as_operator``;
- ``model``: ``ModelOperator``, the shared set-up of the operators of a model's loss;
- ``hessian`` (with ``rop``, exact R-operator products for MLPs), ``ggn``, ``noise`` (noise
  covariance and Fisher through the fused per-sample kernels), ``distributed`` (over ranks);
- ``loss_hessian``: the output-Hessian square roots of cross-entropy and squared error;
- ``diagonal``: exact diagonals of the Fisher, the noise covariance and the GGN, shaped like the parameters;
- ``kfac``: ``KFACOperator`` and ``EKFACOperator``, Kronecker-factored approximations of the GGN / Fisher.
"""
from .base import DenseOperator, Operator, as_operator
from .diagonal import fisher_diagonal, ggn_diagonal, noise_diagonal
from .ggn import GGNOperator
from .hessian import HessianOperator
from .kfac import EKFACOperator, KFACOperator, kfac_parameters
from .noise import FisherOperator, NoiseCovarianceOperator

__all__ = ["Operator", "DenseOperator", "as_operator", "HessianOperator", "GGNOperator", "NoiseCovarianceOperator", "FisherOperator",
           "KFACOperator", "EKFACOperator", "kfac_parameters", "fisher_diagonal", "noise_diagonal", "ggn_diagonal"]
