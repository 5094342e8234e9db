"""TrajectoryRecorder and its crash-safe store: round trips, resume, a SIGKILL mid-write, corruption."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from landscape_kernels.trajectory.recorder import TrajectoryRecorder
from landscape_kernels.trajectory.store import CorruptChunkError, open_trajectory


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))


def drive(recorder, net, steps):
    for step in steps:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * step)
        recorder.record(step)


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_round_trip_every_and_parameter_choice(on_disk, tmp_path):
    net = model()
    rec = TrajectoryRecorder(net, params=["2.weight", "2.bias"], every=2, chunk_size=3,
                             store=tmp_path / "run" if on_disk else None, dtype=torch.float64)
    expected = []
    for step in range(11):
        with torch.no_grad():
            net[2].weight.add_(1.0)
        if rec(step):
            expected.append(torch.cat([net[2].weight.flatten(), net[2].bias]).clone())
    rec.flush()
    assert rec.steps.tolist() == [0, 2, 4, 6, 8, 10]
    assert torch.equal(rec.snapshots(), torch.stack(expected))
    assert torch.equal(rec.snapshots(last=2), torch.stack(expected[-2:]))
    assert rec.unflatten(rec.snapshots()[0])["2.weight"].shape == (2, 3)
    if on_disk:
        assert sorted(os.listdir(tmp_path / "run")) == ["chunk_000000.npz", "chunk_000001.npz", "trajectory.json",
                                                        "writer.lock"]


def test_resume_skips_steps_already_stored(tmp_path):
    net = model()
    with TrajectoryRecorder(net, store=tmp_path, chunk_size=4) as rec:
        drive(rec, net, range(10))
    again = TrajectoryRecorder(net, store=tmp_path, chunk_size=4)
    assert again.last_step == 9
    assert not again.record(7)  # a re-run from an older checkpoint stores nothing twice
    drive(again, net, range(8, 14))
    again.flush()
    assert again.steps.tolist() == list(range(14))


def test_reopening_with_another_layout_is_refused(tmp_path):
    TrajectoryRecorder(model(), store=tmp_path).flush()
    with pytest.raises(ValueError, match="holds a different trajectory: its names"):
        TrajectoryRecorder(model(), params=["0.weight"], store=tmp_path)


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    import landscape_kernels.trajectory.store as tr
    torch.manual_seed(0)
    net = nn.Linear(50, 40)
    from landscape_kernels import TrajectoryRecorder
    rec = TrajectoryRecorder(net, store=sys.argv[1], chunk_size=5)
    real = tr._write_chunk_file
    def torn(tmp_path, steps, snapshots):  # the fourth chunk: half written, then the process is killed
        if len(rec.store) == 3:
            with open(tmp_path, "wb") as f:
                f.write(b"PK" + os.urandom(1000))
                f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real(tmp_path, steps, snapshots)
    tr._write_chunk_file = torn
    for step in range(100):
        with torch.no_grad():
            net.weight.add_(0.1)
        rec.record(step)
""")


def test_sigkill_mid_write_keeps_flushed_chunks_and_resumes(tmp_path):
    store = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert "chunk_000003.npz.tmp" in os.listdir(store)
    layout, reader = open_trajectory(store)  # a reader deletes nothing (the writer might be alive)
    assert len(reader) == 3 and reader.validate() == [] and "chunk_000003.npz.tmp" in os.listdir(store)
    torch.manual_seed(0)
    net = nn.Linear(50, 40)
    with pytest.warns(RuntimeWarning, match=r"discarded torn chunk\(s\) \['chunk_000003.npz.tmp'\]"):
        rec = TrajectoryRecorder(net, store=store, chunk_size=5)  # the next writer (holding the lock) does
    assert rec.last_step == 14  # three chunks of five rows survived
    for step in range(20):
        with torch.no_grad():
            net.weight.add_(0.1)
        rec.record(step)
    rec.flush()
    steps = rec.steps
    assert steps.tolist() == list(range(20))
    X = rec.snapshots()
    assert torch.allclose(X[15, :2000].reshape(40, 50) - X[14, :2000].reshape(40, 50), torch.full((40, 50), 0.1), atol=1e-5)


def test_corrupted_bytes_are_detected_by_chunk_name(tmp_path):
    net = model()
    with TrajectoryRecorder(net, store=tmp_path, chunk_size=2) as rec:
        drive(rec, net, range(6))
    path = tmp_path / "chunk_000001.npz"
    data = bytearray(path.read_bytes())
    data[-300] ^= 0xFF
    path.write_bytes(bytes(data))
    _, reader = open_trajectory(tmp_path)
    assert reader.validate() == ["chunk_000001.npz"]
    with pytest.raises(CorruptChunkError, match="chunk_000001.npz"):
        TrajectoryRecorder(net, store=tmp_path, chunk_size=2).snapshots()


def test_bad_input(tmp_path):
    net = model()
    with pytest.raises(ValueError, match=r"params \['3.weight'\] are not in the source"):
        TrajectoryRecorder(net, params=["3.weight"])
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        TrajectoryRecorder(net, dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="no trajectory store"):
        open_trajectory(tmp_path / "nothing")
    rec = TrajectoryRecorder(net, chunk_size=10)
    rec.record(0)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf at step 1; 0 chunk\\(s\\) and 1 buffered row"):
        rec.record(1)
    assert rec.steps.tolist() == [0]  # what was recorded before is kept
    assert np.isfinite(rec.snapshots().numpy()).all()
