"""MNIST from IDX files in torchvision's layout (ROOT/MNIST/raw/*-idx?-ubyte[.gz]).

The root is the ``root`` argument, else $LANDSCAPE_KERNELS_DATA, else ~/.cache/landscape_kernels. A
missing or malformed file is an error that names the path and says how to provide the data. (The
downloader, digit subsets and the embedded digits dataset come with the analyses that need them.)
"""
import gzip
import os
import struct

import numpy as np
import torch

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
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
