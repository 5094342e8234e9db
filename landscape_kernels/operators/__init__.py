"""Matrix-free symmetric operators, layer 2: the curvature and noise of a model's training loss.

- ``base``: ``Operator`` (``matmat``, ``matvec``, ``@``, ``to_scipy``), ``DenseOperator``, ``as_operator``;
- ``model``: ``ModelOperator``, the shared set-up of the operators of a model's loss;
- ``hessian`` (with ``rop``, exact R-operator products for MLPs), ``ggn``, ``noise`` (noise
  covariance and Fisher through the fused per-sample kernels), ``distributed`` (over ranks).
"""
from .base import DenseOperator, Operator, as_operator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .noise import FisherOperator, NoiseCovarianceOperator

__all__ = ["Operator", "DenseOperator", "as_operator", "HessianOperator", "GGNOperator", "NoiseCovarianceOperator", "FisherOperator"]
