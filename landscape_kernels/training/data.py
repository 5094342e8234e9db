"""Datasets: MNIST from IDX files in torchvision's layout, the embedded scikit-learn digits, subsets.

MNIST lives in ROOT/MNIST/raw/*-idx?-ubyte[.gz]; ROOT is the ``root`` argument, else
$LANDSCAPE_KERNELS_DATA, else ~/.cache/landscape_kernels. A missing or malformed file is an error that
names the path and says how to provide the data; ``download_mnist`` fetches the files for users with
internet (md5-verified, written atomically). ``load_digits`` is the 8 x 8 scikit-learn digits dataset
(1,797 images shipped with scikit-learn): the offline default of the analyses. ``digit_subset``,
``balanced_subset`` and ``with_label_noise`` make the subsets the papers use.
"""
import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib

import numpy as np
import torch

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the uncompressed canonical files (mirrors may compress them differently)
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")


def data_root(root=None):
    return os.path.expanduser(root or os.environ.get("LANDSCAPE_KERNELS_DATA") or "~/.cache/landscape_kernels")


def _find(raw, name):
    for candidate in (os.path.join(raw, name), os.path.join(raw, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}[.gz] not found in {raw}. Put the four MNIST IDX files there (torchvision's "
        "layout ROOT/MNIST/raw/), or point --data-dir / $LANDSCAPE_KERNELS_DATA at a ROOT that has them."
    )


def read_idx(path):
    """An IDX file (plain or gzip) as a numpy array; its header is checked against its size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # EOFError: a gzip stream cut off (a truncated download)
        raise ValueError(f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} ({type(exc).__name__}: "
                         f"{exc or 'the file ends early'}); it is corrupt or truncated: fetch it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the IDX header is truncated (it announces {ndim} dimension(s), the file holds "
                         f"{len(raw)} bytes); the file is corrupt or truncated: fetch it again")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but the file holds {len(body)}: corrupt or truncated")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_mnist(root=None, split="train", dtype=torch.float32):
    """(images (N, 784) in [0, 1] (pixels / 255, no normalisation), labels (N,) int64)."""
    if split not in FILES:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    raw = os.path.join(data_root(root), "MNIST", "raw")
    images = read_idx(_find(raw, FILES[split][0]))
    labels = read_idx(_find(raw, FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{raw}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0).to(dtype)
    return x, torch.from_numpy(labels.astype(np.int64))


def _uncompressed_md5(path):
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"  # the gzip magic number, whatever the file is called
    opener = gzip.open if compressed else open
    h = hashlib.md5()
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_mnist(root=None, mirrors=MIRRORS, progress=True):
    """Fetch the four MNIST files into ROOT/MNIST/raw (files already there and intact are kept). Each
    file is downloaded to a temporary name, its uncompressed md5 checked, then renamed into place, so
    an interrupted download never leaves a partial file under the real name. Returns the raw folder."""
    raw = os.path.join(data_root(root), "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name, md5 in MD5.items():
        target = os.path.join(raw, name + ".gz")
        if os.path.isfile(target) and _uncompressed_md5(target) == md5:
            continue
        errors = []
        for mirror in mirrors:
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".gz.tmp", dir=raw)
            os.close(fd)
            try:
                if progress:
                    print(f"downloading {mirror}{name}.gz", flush=True)
                urllib.request.urlretrieve(mirror + name + ".gz", tmp)
                got = _uncompressed_md5(tmp)
                if got != md5:
                    raise ValueError(f"md5 {got} != {md5}")
                os.replace(tmp, target)
                break
            except Exception as exc:  # try the next mirror; report them all if none works
                errors.append(f"{mirror}: {type(exc).__name__}: {exc}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise RuntimeError(f"download_mnist: could not fetch {name}.gz into {raw}:\n  " + "\n  ".join(errors))
    return raw


def load_digits(split="train", dtype=torch.float32, test_fraction=0.2, seed=0):
    """The scikit-learn 8 x 8 digits: (images (N, 64) in [0, 1] (pixels / 16), labels (N,) int64),
    split into train/test by a stratified shuffle with ``seed`` (the same split on every call)."""
    if split not in ("train", "test"):
        raise ValueError(f"load_digits: split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn "
                          "(or the 'digits' extra of landscape_kernels)") from exc
    digits = sklearn_digits()
    x = torch.tensor(digits.data / 16.0, dtype=dtype)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # the same fraction of every class in the test split
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        test[members[: round(test_fraction * len(members))]] = True
    keep = test if split == "test" else ~test
    return x[keep], y[keep]


def load_dataset(name, split="train", root=None, dtype=torch.float32):
    """"mnist" (from ``root``) or "digits" (embedded) as (images (N, features), labels (N,))."""
    if name == "mnist":
        return load_mnist(root, split, dtype)
    if name == "digits":
        return load_digits(split, dtype)
    raise ValueError(f"load_dataset: name must be 'mnist' or 'digits', got {name!r}")


def digit_subset(x, y, digits, relabel=True):
    """The samples whose label is in ``digits`` (e.g. (0, 1)), in their original order; with ``relabel``
    the labels become positions in ``digits`` (0, 1, ...), otherwise they are kept."""
    digits = [int(d) for d in digits]
    if not digits or len(set(digits)) != len(digits):
        raise ValueError(f"digit_subset: digits must be distinct labels, got {digits}")
    absent = [d for d in digits if not bool((y == d).any())]
    if absent:
        raise ValueError(f"digit_subset: no samples with label(s) {absent}")
    keep = torch.isin(y, torch.tensor(digits, device=y.device))
    labels = y[keep]
    if relabel:
        lookup = torch.full((int(y.max()) + 1,), -1, dtype=torch.long, device=y.device)
        lookup[torch.tensor(digits, device=y.device)] = torch.arange(len(digits), device=y.device)
        labels = lookup[labels]
    return x[keep], labels


def balanced_subset(x, y, per_class, seed=0):
    """``per_class`` samples drawn without replacement from every class present (seeded), returned in
    their original order."""
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"balanced_subset: per_class must be a positive int, got {per_class!r}")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero().flatten().cpu()
        if len(members) < per_class:
            raise ValueError(f"balanced_subset: class {c} has {len(members)} samples, fewer than per_class = {per_class}")
        chosen.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    idx = torch.cat(chosen).sort().values.to(y.device)
    return x[idx], y[idx]


def with_label_noise(y, fraction, num_classes=None, seed=0):
    """(noisy labels, mask of changed samples): a ``fraction`` of the samples (chosen with ``seed``)
    gets a label drawn uniformly from the other classes, so every chosen label really changes."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"with_label_noise: fraction must be in [0, 1], got {fraction!r}")
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise ValueError(f"with_label_noise: needs at least 2 classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    n = round(float(fraction) * len(y))
    idx = torch.randperm(len(y), generator=g)[:n].to(y.device)
    shift = torch.randint(1, num_classes, (n,), generator=g).to(y.device)  # never 0: a different class
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % num_classes
    changed = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    changed[idx] = True
    return noisy, changed
