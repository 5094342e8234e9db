"""The MNIST IDX reader on generated files, and on ../shared/data when it is there."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from landscape_kernels.training.data import (MD5, balanced_subset, digit_subset, download_mnist, load_dataset, load_digits,
                                    load_mnist, read_idx, with_label_noise)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


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


HAS_SHARED = os.path.isdir(os.path.join(SHARED, "MNIST"))


@pytest.mark.skipif(not HAS_SHARED, reason="../shared/data not present")
def test_download_from_a_mirror_verifies_and_keeps_intact_files(tmp_path):
    mirror = "file://" + os.path.abspath(os.path.join(SHARED, "MNIST", "raw")) + "/"
    raw = download_mnist(str(tmp_path), mirrors=("file:///nonexistent/", mirror), progress=False)
    assert sorted(os.listdir(raw)) == sorted(n + ".gz" for n in MD5)  # no temporary file left behind
    x, y = load_mnist(str(tmp_path), "test")
    assert x.shape == (10000, 784)
    download_mnist(str(tmp_path), mirrors=(), progress=False)  # everything intact: nothing to fetch


def test_download_rejects_a_wrong_file_and_names_it(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MD5:  # right names, wrong contents
        write_idx(str(mirror / name), np.zeros((3, 2, 2)), compress=True)
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="(?s)could not fetch train-images-idx3-ubyte.gz.*md5"):
        download_mnist(str(root), mirrors=("file://" + str(mirror) + "/",), progress=False)
    assert os.listdir(root / "MNIST" / "raw") == []  # nothing partial under any name


def test_digits_split_is_stratified_and_fixed():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape[1] == 64 and x.shape[0] + xt.shape[0] == 1797
    assert float(x.min()) >= 0 and float(x.max()) == 1.0
    for c in range(10):
        share = float((yt == c).sum()) / float((y == c).sum() + (yt == c).sum())
        assert abs(share - 0.2) < 0.01
    assert torch.equal(load_digits("test")[0], xt)
    assert torch.equal(load_dataset("digits", "test")[1], yt)
    with pytest.raises(ValueError, match="name must be 'mnist' or 'digits'"):
        load_dataset("cifar")


def test_digit_subset_relabels_and_checks():
    x = torch.arange(10.0)[:, None]
    y = torch.tensor([0, 1, 2, 3, 2, 3, 0, 1, 4, 3])
    xs, ys = digit_subset(x, y, (2, 3))
    assert xs.flatten().tolist() == [2, 3, 4, 5, 9] and ys.tolist() == [0, 1, 0, 1, 1]
    assert digit_subset(x, y, (2, 3), relabel=False)[1].tolist() == [2, 3, 2, 3, 3]
    with pytest.raises(ValueError, match="no samples with label\\(s\\) \\[7\\]"):
        digit_subset(x, y, (2, 7))


def test_balanced_subset_and_label_noise():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    x = torch.arange(len(y))
    xs, ys = balanced_subset(x, y, 4, seed=1)
    assert torch.bincount(ys).tolist() == [4, 4, 4] and torch.equal(xs, xs.sort().values)
    assert torch.equal(y[xs], ys)
    with pytest.raises(ValueError, match="class 1 has 5 samples, fewer than per_class = 6"):
        balanced_subset(x, y, 6)
    big = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    noisy, changed = with_label_noise(big, 0.3, seed=2)
    assert int(changed.sum()) == 300 and bool((noisy[changed] != big[changed]).all())
    assert torch.equal(noisy[~changed], big[~changed]) and int(noisy.max()) <= 9 and int(noisy.min()) >= 0
    assert torch.equal(with_label_noise(big, 0.3, seed=2)[0], noisy)
    with pytest.raises(ValueError, match="fraction must be in \\[0, 1\\]"):
        with_label_noise(big, 1.5)
