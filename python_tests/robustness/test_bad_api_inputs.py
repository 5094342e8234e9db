"""The public Python API refuses bad input with an error naming the argument (or file) and what was
expected: one table of (call, exception type, message fragment), over the linear algebra, the
operators, the analyses, the capture, the trainer, the optimizers, the data readers and the stores."""
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.analyses.directional import per_sample_directional_derivatives
from landscape_kernels.analyses.fits import power_law_fit
from landscape_kernels.capture.persample import PerSampleGradients
from landscape_kernels.linalg.density import spectral_density
from landscape_kernels.linalg.lanczos import lanczos_eigs
from landscape_kernels.linalg.profiles import flatness, loss_profiles
from landscape_kernels.linalg.traces import hutchinson_trace
from landscape_kernels.operators.base import DenseOperator
from landscape_kernels.operators.hessian import HessianOperator
from landscape_kernels.training.callbacks import WindowRecorder
from landscape_kernels.training.data import read_idx
from landscape_kernels.training.optim import NSGD
from landscape_kernels.training.trainer import SGDTrainer
from landscape_kernels.trajectory.pca import StreamingPCA
from landscape_kernels.trajectory.recorder import TrajectoryRecorder
from landscape_kernels.trajectory.store import CorruptChunkError, open_trajectory


def spd(n=30, seed=0):
    M = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return M @ M.T / n + torch.eye(n, dtype=torch.float64)


def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    return model, (x, y)


def unit_directions(model, k=2):
    P = sum(p.numel() for p in model.parameters())
    d = torch.randn(k, P, generator=torch.Generator().manual_seed(1))
    return d / d.norm(dim=1, keepdim=True)


def flat_call(**kwargs):
    model, data = classifier()
    return lambda: flatness(model, F.cross_entropy, data, unit_directions(model), **kwargs)


def profiles_call(deltas):
    model, data = classifier()
    return lambda: loss_profiles(model, F.cross_entropy, data, unit_directions(model), deltas)


def two_forwards():
    model, (x, _) = classifier()
    with PerSampleGradients(model) as ps:
        model(x)
        model(x).sum().backward()
    return ps.sq_norms()


def two_backwards():
    model, (x, _) = classifier()
    with PerSampleGradients(model) as ps:
        loss = model(x).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    return ps.sq_norms()


def statistics_inside_the_block():
    model, (x, _) = classifier()
    with PerSampleGradients(model) as ps:
        model(x).sum().backward()
        return ps.sq_norms()


def nsgd(E):
    model = nn.Linear(3, 2)
    return lambda: NSGD(model.parameters(), lr=0.1, gamma=0.5).set_subspace(E)


def trainer(**kwargs):
    model, (x, y) = classifier()
    settings = {"batch_size": 5, **kwargs}
    return lambda: SGDTrainer(model, x, y, **settings)


def pca_fit(X, **kwargs):
    # the fit is lazy: the solve (and its rank checks) runs when a result is read
    return lambda: StreamingPCA(**kwargs).fit(X).explained_variance_


def truncated_checkpoint(tmp):
    """A checkpoint cut short, as a full disk or a killed copy leaves it."""
    path = os.path.join(tmp, "cut.pt")
    torch.save({"model": {"w": torch.randn(50, 50)}}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def idx_file(tmp, name, data, compress=False):
    path = os.path.join(tmp, name)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return path


def truncated_gzip(tmp):
    full = idx_file(tmp, "full.gz", b"\x00\x00\x08\x01" + (1000).to_bytes(4, "big") + bytes(1000), compress=True)
    raw = open(full, "rb").read()
    return idx_file(tmp, "cut.gz", raw[: len(raw) // 2])


def recorder_into(store, **kwargs):
    return lambda: TrajectoryRecorder(nn.Linear(3, 2), store=store, **kwargs)


def a_store(tmp, chunk_size=2, every=1):
    net = nn.Linear(3, 2)
    with TrajectoryRecorder(net, store=os.path.join(tmp, "store"), chunk_size=chunk_size, every=every) as rec:
        for step in range(4):
            rec.record(step)
    return os.path.join(tmp, "store")


def wrong_width_chunk(tmp):
    """A chunk whose checksum is valid but whose rows are one number short."""
    from landscape_kernels.trajectory import store as store_module

    path = a_store(tmp)
    steps, snaps = np.arange(2, dtype=np.int64), np.zeros((2, 7), dtype=np.float32)
    with open(os.path.join(path, "chunk_000001.npz"), "wb") as f:
        np.savez(f, steps=steps, snapshots=snaps, sha256=store_module._checksum(steps, snaps))
    return lambda: open_trajectory(path)[1].read(1)


def corrupt_layout(tmp):
    path = a_store(tmp)
    with open(os.path.join(path, "trajectory.json"), "w") as f:
        f.write('{"format": "landscape_kernels.traj')
    return lambda: open_trajectory(path)


def window_recorder(**kwargs):
    model, _ = classifier()
    return lambda: WindowRecorder(model, **kwargs)


def hessian_operator(data):
    model, _ = classifier()
    return lambda: HessianOperator(model, F.cross_entropy, data)


def directional(directions):
    model, (x, y) = classifier()
    return lambda: per_sample_directional_derivatives(model, F.cross_entropy, x, y, "2.weight", directions)


def cases(tmp):
    A = spd()
    nonsym = torch.randn(30, 30, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(6, 2)).Q
    return [
        # linear algebra
        ("lanczos k too large", lambda: lanczos_eigs(A, 31), ValueError, "k must be an int in [1, 30]"),
        ("lanczos k zero", lambda: lanczos_eigs(A, 0), ValueError, "k must be an int in [1, 30]"),
        ("lanczos which", lambda: lanczos_eigs(A, 2, which="top"), ValueError, "which must be one of"),
        ("lanczos tol negative", lambda: lanczos_eigs(A, 2, tol=-1e-3), ValueError, "tol must be a finite number >= 0"),
        ("lanczos tol NaN", lambda: lanczos_eigs(A, 2, tol=float("nan")), ValueError, "tol must be a finite number >= 0"),
        ("lanczos num_iter 0", lambda: lanczos_eigs(A, 2, num_iter=0), ValueError, "num_iter must be None or an int >= 1"),
        ("lanczos block_size 0", lambda: lanczos_eigs(A, 2, block_size=0), ValueError, "block_size must be in"),
        ("lanczos max_basis small", lambda: lanczos_eigs(A, 2, max_basis=3), ValueError, "max_basis must be an int >="),
        ("lanczos non-symmetric dense", lambda: lanczos_eigs(nonsym, 2), ValueError, "op must be a symmetric matrix"),
        ("lanczos NaN matrix", lambda: lanczos_eigs(A.index_fill(0, torch.tensor([0]), float("nan")), 2), ValueError,
         "op must be a symmetric matrix"),
        ("lanczos not square", lambda: lanczos_eigs(DenseOperator(torch.randn(3, 4)), 2), ValueError, "square"),
        ("lanczos NaN v0", lambda: lanczos_eigs(A, 2, v0=torch.full((30,), float("nan"))), ValueError, "v0 contains NaN"),
        ("lanczos residuals", lambda: lanczos_eigs(A, 2, residuals="exact"), ValueError, "residuals must be one of"),
        ("density sigma NaN", lambda: spectral_density(A, sigma=float("nan")), ValueError, "sigma must be None or a finite"),
        ("density sigma negative", lambda: spectral_density(A, sigma=-1.0), ValueError, "sigma must be None or a finite"),
        ("density probes 0", lambda: spectral_density(A, num_probes=0), ValueError, "num_probes must be a positive int"),
        ("density steps 0", lambda: spectral_density(A, num_steps=0), ValueError, "num_steps must be a positive int"),
        ("density grid NaN", lambda: spectral_density(A, grid=torch.tensor([0.0, float("nan")])), ValueError,
         "grid must be None or a non-empty 1-D tensor"),
        ("density grid_points 1", lambda: spectral_density(A, grid_points=1), ValueError, "grid_points must be an int >= 2"),
        ("hutchinson probes 0", lambda: hutchinson_trace(A, num_probes=0), ValueError, "num_probes"),
        # flatness and profiles
        ("flatness tol below resolution", flat_call(tol=1e-15), ValueError, "below the float64 resolution"),
        ("flatness tiny step", flat_call(step=1e-9), ValueError, "raise step or lower cap"),
        ("flatness cap inf", flat_call(cap=float("inf")), ValueError, "cap must be a finite number > 0"),
        ("flatness threshold NaN", flat_call(threshold=float("nan")), ValueError, "threshold must be a finite number > 0"),
        ("flatness tol 0", flat_call(tol=0.0), ValueError, "tol must be a finite number > 0"),
        ("profiles NaN deltas", profiles_call(torch.tensor([0.0, float("nan")])), ValueError, "deltas must be finite"),
        ("profiles no deltas", profiles_call(torch.tensor([])), ValueError, "deltas holds no offsets"),
        ("directional wrong shape", directional(torch.randn(2, 5)), ValueError, "directions must have shape"),
        ("directional NaN", directional(torch.full((2, 3, 6), float("nan"))), ValueError, "directions contain NaN"),
        ("power-law fit too few", lambda: power_law_fit(np.array([1.0]), np.array([2.0])), ValueError, ""),
        # capture
        ("two forwards in a block", two_forwards, RuntimeError, "forward passes in one `with` block"),
        ("two backwards in a block", two_backwards, RuntimeError, "two backward passes ran through one forward"),
        ("statistics inside the block", statistics_inside_the_block, RuntimeError, "after the `with` block"),
        ("empty batch operator", hessian_operator((torch.randn(0, 4), torch.randint(0, 3, (0,)))), ValueError, "empty"),
        # optimizers and training
        ("NSGD NaN subspace", nsgd(torch.full((8, 2), float("nan"))), ValueError, "E contains NaN/Inf"),
        ("NSGD not orthonormal", nsgd(2 * torch.linalg.qr(torch.randn(8, 2)).Q), ValueError, "must be orthonormal"),
        ("NSGD wrong rows", nsgd(Q), ValueError, "E must be (8, K)"),
        ("trainer batch 0", trainer(batch_size=0), ValueError, "batch_size must be an int in [1, 20]"),
        ("trainer batch too big", trainer(batch_size=21), ValueError, "batch_size must be an int in [1, 20]"),
        ("trainer lr negative", trainer(lr=-0.1), ValueError, "lr must be a positive finite number"),
        ("trainer lr NaN", trainer(lr=float("nan")), ValueError, "lr must be a positive finite number"),
        ("trainer momentum 1", trainer(momentum=1.0), ValueError, "momentum must be in [0, 1)"),
        ("trainer clip 0", trainer(clip_grad_norm=0.0), ValueError, "clip_grad_norm must be None or a positive"),
        ("trainer empty data", lambda: SGDTrainer(nn.Linear(2, 2), torch.randn(0, 2), torch.zeros(0, dtype=torch.long)),
         ValueError, "the training set is empty"),
        ("trainer resume missing", lambda: trainer(checkpoint=os.path.join(tmp, "none.pt"))().resume(),
         FileNotFoundError, "no checkpoint at"),
        ("trainer resume truncated", lambda: trainer(checkpoint=truncated_checkpoint(tmp))().resume(), ValueError,
         "is not a readable state file"),
        ("window 0", window_recorder(params=["0.weight"], window=0), ValueError, "window must be a positive int"),
        ("window unknown param", window_recorder(params=["9.weight"], window=5), ValueError, "are not parameters"),
        # data files
        ("idx truncated gzip", lambda: read_idx(truncated_gzip(tmp)), ValueError, "corrupt or truncated"),
        ("idx truncated header", lambda: read_idx(idx_file(tmp, "hdr", b"\x00\x00\x08\x03\x00\x00")), ValueError,
         "IDX header is truncated"),
        ("idx bad magic", lambda: read_idx(idx_file(tmp, "magic", b"\x01\x02\x03\x04")), ValueError, "bad magic number"),
        ("idx short body", lambda: read_idx(idx_file(tmp, "short", b"\x00\x00\x08\x01\x00\x00\x00\x09" + bytes(3))),
         ValueError, "corrupt or truncated"),
        # PCA
        ("pca sketch_size 1", lambda: StreamingPCA(3, sketch_size=1), ValueError, "sketch_size must be an int >= 2"),
        ("pca sketch_size <= k", lambda: StreamingPCA(3, sketch_size=3), ValueError, "must exceed n_components"),
        ("pca NaN", pca_fit(torch.full((5, 4), float("nan")), n_components=2), ValueError, "NaN/Inf"),
        ("pca empty", pca_fit(torch.zeros(0, 4), n_components=2), ValueError, "must have shape (T, N) with T, N > 0"),
        ("pca int", pca_fit(torch.zeros(5, 4, dtype=torch.int32), n_components=2), TypeError, "float32 or float64"),
        ("pca transform before fit", lambda: StreamingPCA(2).transform(torch.randn(3, 4)), RuntimeError,
         "no snapshots yet"),
        ("pca constant gram", pca_fit(torch.ones(10, 30), n_components=3, mode="gram"), ValueError, "do not vary"),
        ("pca constant sketch", pca_fit(torch.ones(10, 30), n_components=3, mode="sketch"), ValueError, "do not vary"),
        ("pca beyond rank", pca_fit(torch.randn(4, 30), n_components=4, mode="gram"), ValueError,
         "span only 3 direction(s)"),
        ("pca too many components", pca_fit(torch.randn(4, 30), n_components=5), ValueError, "exceeds min(T, N)"),
        # stores
        ("store is a file", lambda: recorder_into(idx_file(tmp, "plain", b"x"))(), ValueError,
         "is a file; expected a directory"),
        ("store under a file", lambda: recorder_into(os.path.join(idx_file(tmp, "plain2", b"x"), "sub"))(), ValueError,
         "a part of the path is a file"),
        ("store other chunk_size", lambda: recorder_into(a_store(os.path.join(tmp, "cs")), chunk_size=3)(), ValueError,
         "its chunk_size is 2"),
        ("store other every", lambda: recorder_into(a_store(os.path.join(tmp, "ev")), chunk_size=2, every=2)(),
         ValueError,
         "its every is 1"),
        ("store corrupt layout", lambda: corrupt_layout(os.path.join(tmp, "cl"))(), ValueError,
         "trajectory.json: not a readable"),
        ("store wrong width chunk", lambda: wrong_width_chunk(os.path.join(tmp, "ww"))(), CorruptChunkError,
         "rows of 8 numbers"),
        ("store missing", lambda: open_trajectory(os.path.join(tmp, "nothing")), FileNotFoundError, "no trajectory store"),
        ("recorder every 0", lambda: TrajectoryRecorder(nn.Linear(3, 2), every=0), ValueError, "every must be a positive"),
        ("recorder float16", lambda: TrajectoryRecorder(nn.Linear(3, 2), dtype=torch.float16), TypeError, "dtype must be"),
        ("recorder snapshots last -1", lambda: TrajectoryRecorder(nn.Linear(3, 2)).snapshots(last=-1), ValueError,
         "last must be None or an int >= 0"),
    ]


CASE_IDS = [c[0] for c in cases("/nonexistent")]


@pytest.mark.parametrize("label", CASE_IDS)
def test_a_bad_api_input_is_refused_with_a_clear_error(label, tmp_path):
    _, call, exc, fragment = next(c for c in cases(str(tmp_path)) if c[0] == label)
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only folder")
def test_a_read_only_store_fails_when_opened_not_at_the_first_flush(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            TrajectoryRecorder(nn.Linear(3, 2), store=folder)
    finally:
        folder.chmod(0o700)


def test_snapshots_last_zero_is_empty(tmp_path):
    rec = TrajectoryRecorder(nn.Linear(3, 2))
    for step in range(3):
        rec.record(step)
    assert rec.snapshots(last=0).shape == (0, 8) and rec.snapshots(last=2).shape == (2, 8)
    assert rec.snapshots(last=10).shape == (3, 8)
