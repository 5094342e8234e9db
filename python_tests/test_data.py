"""The MNIST IDX reader on generated files, and on ../shared/data when it is there."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from landscape_kernels.data import load_mnist, read_idx

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path + ".gz", "wb") if compress else open(path, "wb")) as f:
        f.write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_generated_idx_files(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write_idx(str(raw / "t10k-images-idx3-ubyte"), images, compress)
    write_idx(str(raw / "t10k-labels-idx1-ubyte"), labels, compress)
    x, y = load_mnist(str(tmp_path), "test")
    assert x.shape == (7, 784) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(x[3], torch.from_numpy(images[3].reshape(-1) / 255.0).float())


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*LANDSCAPE_KERNELS_DATA"):
        load_mnist(str(tmp_path))
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(str(bad))
    (tmp_path / "magic").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(str(tmp_path / "magic"))
    with pytest.raises(ValueError, match="split must be"):
        load_mnist(str(tmp_path), "validation")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "MNIST")), reason="../shared/data not present")
def test_shared_mnist():
    x, y = load_mnist(SHARED, "test")
    assert x.shape == (10000, 784) and y.shape == (10000,) and set(y.unique().tolist()) == set(range(10))
