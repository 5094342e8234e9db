"""Noise against curvature in ``analyse``: how much the top noise directions and the top Hessian
directions share, and the exponent gamma of C_ii ~ H_ii^gamma in the Hessian's top eigenbasis (Zhang,
Yang & Tu 2026 measure 1 <= gamma <= 2 on one layer; here over the top-k eigenvectors of the whole
model, H_ii = lambda_i and C_ii = v_i^T C_1 v_i)."""
import numpy as np
import torch

from ..fits import power_law_fit


def overlap_stage(problem, results, arrays):
    VH = arrays["hessian_eigenvectors"]  # (k, P) float64, orthonormal rows
    VC = arrays["noise_eigenvectors"]
    lam = np.asarray(results["hessian"]["eigenvalues"], dtype=np.float64)
    O = (VH @ VC.T) ** 2  # squared cosines
    k = min(VH.shape[0], VC.shape[0])
    C = problem.noise()
    V = torch.from_numpy(np.ascontiguousarray(VH.T)).to(C.device, C.dtype)
    Cii = (V * C.matmat(V)).sum(0).double().cpu().numpy()
    keep = (lam > 0) & (Cii > 0)
    fit = power_law_fit(lam[keep], Cii[keep]).to_dict() if keep.sum() >= 3 else None
    result = {
        "subspace_overlap": float(O[:k, :k].sum() / k),  # (1/k) ||V_H^T V_C||_F^2 over the top k of each
        "random_overlap": k / problem.num_params,  # its expectation for random subspaces
        "top_cosine_sq": float(O[0, 0]),
        "best_match": [int(j) for j in O.argmax(1)],
        "H_ii": lam.tolist(), "C_ii": Cii.tolist(), "gamma": fit,
        "gamma_points": int(keep.sum()),
    }
    return result, {"overlap_matrix": O}
