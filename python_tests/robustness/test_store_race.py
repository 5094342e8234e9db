"""A live trajectory store: readers open and read it while another process writes it, and never break
the writer; a second writing process is refused; the lock dies with its process."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from landscape_kernels.trajectory.recorder import TrajectoryRecorder
from landscape_kernels.trajectory.store import StoreLockedError, open_trajectory

WRITER = r"""
import sys, torch
from torch import nn
from landscape_kernels.trajectory.recorder import TrajectoryRecorder
torch.manual_seed(0)
net = nn.Linear(30, 20)
with TrajectoryRecorder(net, store=sys.argv[1], chunk_size=3) as rec:
    print("open", flush=True)
    for step in range(int(sys.argv[2])):
        with torch.no_grad():
            net.weight.add_(1.0)
        rec.record(step)
print("done", flush=True)
"""


def _writer(store, steps):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open", proc.stderr.read()
    return proc


def test_readers_of_a_live_store_never_break_its_writer(tmp_path):
    store = tmp_path / "live"
    proc = _writer(store, 9000)
    reads = 0
    while proc.poll() is None:
        layout, reader = open_trajectory(store)
        for i in range(len(reader)):
            steps, X = reader.read(i)  # every chunk a reader lists is complete and checksummed
            assert X.shape == (3, 620) and torch.allclose(X[:, 0] - X[0, 0], (steps - steps[0]).float(), atol=1e-3)
        reads += 1
    out, err = proc.communicate()
    assert proc.returncode == 0 and out.strip() == "done", err
    assert reads > 5
    _, reader = open_trajectory(store)
    assert len(reader) == 3000 and not [n for n in os.listdir(store) if n.endswith(".tmp")]


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_process(tmp_path):
    store = tmp_path / "live"
    proc = _writer(store, 10**9)
    try:
        with pytest.raises(StoreLockedError, match="being written by another live process"):
            TrajectoryRecorder(nn.Linear(30, 20), store=store, chunk_size=3)
        while not (store / "chunk_000000.npz").exists():
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    time.sleep(0.05)
    rec = TrajectoryRecorder(nn.Linear(30, 20), store=store, chunk_size=3)  # SIGKILL released the lock
    assert rec.last_step is not None
    rec.close()


def test_a_recorder_made_again_in_the_same_process_takes_the_store_over(tmp_path):
    net = nn.Linear(3, 2)
    first = TrajectoryRecorder(net, store=tmp_path, chunk_size=2)
    first.record(0)
    first.record(1)  # a chunk written, then the notebook cell fails and is run again
    second = TrajectoryRecorder(net, store=tmp_path, chunk_size=2)
    assert second.last_step == 1
    second.record(2)
    second.record(3)
    with pytest.raises(StoreLockedError, match="newer recorder in this process took it over"):
        first.record(4)
        first.record(5)
