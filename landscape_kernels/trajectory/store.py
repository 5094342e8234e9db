"""The crash-safe chunked stores of weight trajectories.

``TrajectoryRecorder`` (``trajectory.recorder``) hands its rows to a store in chunks. The store is in
memory (``MemoryStore``) or a directory on disk (``DirectoryStore``):

    DIR/trajectory.json       layout: parameter names and shapes, dtype, chunk size, every
    DIR/chunk_000000.npz      steps (T_c,) int64, snapshots (T_c, N), sha256 of both (uint8[32])

Chunks are plain numpy archives (never pickle), written to ``*.tmp``, flushed to disk and renamed, so a
chunk file either is complete or does not exist: a run killed at any moment loses at most the rows not
yet flushed. A leftover ``*.tmp`` (the torn chunk of a killed run) is reported and removed when the
store is reopened; reading checks each chunk's checksum and names a corrupt chunk's file.
"""
import hashlib
import json
import os
import warnings

import numpy as np
import torch

FORMAT = "landscape_kernels.trajectory"
VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CorruptChunkError(RuntimeError):
    """A chunk file whose bytes do not match its checksum (or cannot be parsed)."""


def _checksum(steps, snapshots):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(steps).tobytes())
    h.update(np.ascontiguousarray(snapshots).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_chunk_file(tmp_path, steps, snapshots):
    """Write the archive to ``tmp_path`` and force it to disk (separate so tests can tear it)."""
    with open(tmp_path, "wb") as f:
        np.savez(f, steps=steps, snapshots=snapshots, sha256=_checksum(steps, snapshots))
        f.flush()
        os.fsync(f.fileno())


class MemoryStore:
    """Chunks kept as CPU tensors."""

    path = None

    def __init__(self):
        self._chunks = []

    def append(self, steps, snapshots):
        self._chunks.append((steps.clone(), snapshots.clone()))

    def __len__(self):
        return len(self._chunks)

    def read(self, index):
        return self._chunks[index]

    def last_step(self):
        return int(self._chunks[-1][0][-1]) if self._chunks else None


class DirectoryStore:
    """Chunks as checksummed ``.npz`` files in a directory (see the module docstring)."""

    def __init__(self, path, layout):
        self.path = os.fspath(path)
        self.torn_chunks = []
        meta_path = os.path.join(self.path, "trajectory.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                stored = json.load(f)
            if stored.get("format") != FORMAT:
                raise ValueError(f"{meta_path}: not a landscape_kernels trajectory store")
            for key in ("names", "shapes", "dtype"):
                if stored[key] != layout[key]:
                    raise ValueError(f"store {self.path!r} holds a different trajectory: its {key} is {stored[key]}, "
                                     f"this recorder's is {layout[key]}; use another path")
            for name in sorted(os.listdir(self.path)):
                if name.endswith(".tmp"):  # a chunk being written when the last run was killed
                    self.torn_chunks.append(name)
                    os.remove(os.path.join(self.path, name))
            if self.torn_chunks:
                warnings.warn(f"trajectory store {self.path!r}: discarded torn chunk(s) {self.torn_chunks} "
                              "left by an interrupted run", RuntimeWarning, stacklevel=3)
        else:
            os.makedirs(self.path, exist_ok=True)
            tmp = meta_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"format": FORMAT, "version": VERSION, **layout}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, meta_path)
            _fsync_dir(self.path)
        self.dtype = DTYPES[layout["dtype"]]
        self._files = sorted(n for n in os.listdir(self.path) if n.startswith("chunk_") and n.endswith(".npz"))
        for i, name in enumerate(self._files):
            if name != self._chunk_name(i):
                raise CorruptChunkError(f"{os.path.join(self.path, name)}: chunk files are not numbered 0..{len(self._files) - 1}"
                                        f" (expected {self._chunk_name(i)}); a chunk is missing")

    @staticmethod
    def _chunk_name(index):
        return f"chunk_{index:06d}.npz"

    def append(self, steps, snapshots):
        name = self._chunk_name(len(self._files))
        final = os.path.join(self.path, name)
        _write_chunk_file(final + ".tmp", steps.numpy(), snapshots.numpy())
        os.replace(final + ".tmp", final)
        _fsync_dir(self.path)
        self._files.append(name)

    def __len__(self):
        return len(self._files)

    def read(self, index):
        path = os.path.join(self.path, self._files[index])
        try:
            with np.load(path, allow_pickle=False) as z:
                steps, snapshots, digest = z["steps"], z["snapshots"], z["sha256"]
        except Exception as exc:
            raise CorruptChunkError(f"{path}: unreadable chunk ({type(exc).__name__}: {exc})") from exc
        if not np.array_equal(digest, _checksum(steps, snapshots)):
            raise CorruptChunkError(f"{path}: checksum mismatch, the chunk's bytes are corrupt")
        if snapshots.dtype != np.dtype(str(self.dtype).replace("torch.", "")):
            raise CorruptChunkError(f"{path}: snapshots are {snapshots.dtype}, the store's layout says {self.dtype}")
        return torch.from_numpy(steps), torch.from_numpy(snapshots)

    def validate(self):
        """Names of the chunk files that fail their checksum (empty when all are intact)."""
        bad = []
        for i in range(len(self)):
            try:
                self.read(i)
            except CorruptChunkError:
                bad.append(self._files[i])
        return bad

    def last_step(self):
        return int(self.read(len(self) - 1)[0][-1]) if len(self) else None


def open_trajectory(path):
    """Read-only access to a store on disk: (layout dict, DirectoryStore)."""
    meta_path = os.path.join(os.fspath(path), "trajectory.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"open_trajectory: no trajectory store at {os.fspath(path)!r} (missing trajectory.json)")
    with open(meta_path) as f:
        layout = json.load(f)
    return layout, DirectoryStore(path, layout)
