"""Weight-trajectory recording in a crash-safe chunked store (DESIGN §2.2, SPEC §1.2).

``TrajectoryRecorder`` copies the chosen parameters (flattened in a fixed order into rows of N numbers)
at the steps it is asked to record, into a buffer of ``chunk_size`` rows that is handed to a store when
full. The store is in memory (``store=None``) or a directory on disk:

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

from ._checks import all_finite

FORMAT = "landscape_kernels.trajectory"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
        self.dtype = _DTYPES[layout["dtype"]]
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


def _named_tensors(source, params):
    if isinstance(source, torch.nn.Module):
        named = dict(source.named_parameters())
    elif isinstance(source, dict):
        named = dict(source)
    else:
        raise TypeError(f"TrajectoryRecorder: source must be an nn.Module or a dict name -> tensor, got {type(source).__name__}")
    if params is not None:
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"TrajectoryRecorder: params {missing} are not in the source (it has {list(named)})")
        named = {n: named[n] for n in params}
    if not named:
        raise ValueError("TrajectoryRecorder: no parameters to record")
    for n, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"TrajectoryRecorder: {n!r} must be a floating-point tensor")
    return named


class TrajectoryRecorder:
    """Snapshots of parameters along training.

    Args:
        source: an ``nn.Module`` (its parameters) or a dict name -> tensor (read at each ``record``).
        params: names to record (default all), e.g. ``["2.weight"]`` for W2 of the SPEC §1.1 network.
        every: record only steps divisible by ``every``.
        store: None (memory) or a directory path; an existing store with the same layout is resumed.
        dtype: snapshot dtype (float32 or float64).
        chunk_size: rows per chunk (the most a crash can lose).

    ``record(step)`` (also ``recorder(step)``, for use as a training callback) returns whether it stored
    a row; steps not above the last stored one are skipped, so a run resumed from a checkpoint re-records
    nothing. Read back with ``snapshots()``, ``steps`` and ``chunks()``; call ``flush()`` or ``close()``
    (or use ``with``) at the end.
    """

    def __init__(self, source, params=None, every=1, store=None, dtype=torch.float32, chunk_size=1000):
        if dtype not in _DTYPES.values():
            raise TypeError(f"TrajectoryRecorder: dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"TrajectoryRecorder: every must be a positive int, got {every!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"TrajectoryRecorder: chunk_size must be a positive int, got {chunk_size!r}")
        self._source, self._named = source, _named_tensors(source, params)
        self.names = list(self._named)
        self.shapes = [tuple(t.shape) for t in self._named.values()]
        self.sizes = [t.numel() for t in self._named.values()]
        self.num_params = sum(self.sizes)
        self.every, self.dtype, self.chunk_size = every, dtype, chunk_size
        layout = {"names": self.names, "shapes": [list(s) for s in self.shapes],
                  "dtype": str(dtype).replace("torch.", ""), "chunk_size": chunk_size, "every": every}
        self.store = MemoryStore() if store is None else DirectoryStore(store, layout)
        self.last_step = self.store.last_step()
        self._buffer = torch.empty(chunk_size, self.num_params, dtype=dtype)
        self._buffer_steps = torch.empty(chunk_size, dtype=torch.int64)
        self._rows = 0

    def _current(self):
        if isinstance(self._source, dict):  # read again: the dict may hold new tensors
            return [self._source[n] for n in self.names]
        return list(self._named.values())

    def record(self, step):
        step = int(step)
        if step % self.every or (self.last_step is not None and step <= self.last_step):
            return False
        row = self._buffer[self._rows]
        offset = 0
        with torch.no_grad():
            for t, size in zip(self._current(), self.sizes):
                row[offset : offset + size].copy_(t.detach().reshape(-1))
                offset += size
        if not all_finite(row):
            raise ValueError(f"TrajectoryRecorder: the parameters hold NaN/Inf at step {step}; "
                             f"{len(self.store)} chunk(s) and {self._rows} buffered row(s) before it are kept (call flush())")
        self._buffer_steps[self._rows] = step
        self._rows += 1
        self.last_step = step
        if self._rows == self.chunk_size:
            self.flush()
        return True

    __call__ = record

    def flush(self):
        """Hand the buffered rows to the store (on disk: one new chunk file, written atomically)."""
        if self._rows:
            self.store.append(self._buffer_steps[: self._rows], self._buffer[: self._rows])
            self._rows = 0

    def close(self):
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()

    def chunks(self):
        """Iterate over (steps (T_c,), snapshots (T_c, N)): stored chunks, then the unflushed rows."""
        for i in range(len(self.store)):
            yield self.store.read(i)
        if self._rows:
            yield self._buffer_steps[: self._rows].clone(), self._buffer[: self._rows].clone()

    @property
    def steps(self):
        parts = [s for s, _ in self.chunks()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def snapshots(self, last=None):
        """All recorded rows as one (T, N) tensor, or only the ``last`` ones (e.g. the analysis window)."""
        parts = [x for _, x in self.chunks()]
        X = torch.cat(parts) if parts else torch.empty(0, self.num_params, dtype=self.dtype)
        return X if last is None else X[-last:]

    def unflatten(self, row):
        """A (N,) row back to a dict name -> tensor of the recorded shapes."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(row, self.sizes), self.shapes)}


def open_trajectory(path):
    """Read-only access to a store on disk: (layout dict, DirectoryStore)."""
    meta_path = os.path.join(os.fspath(path), "trajectory.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"open_trajectory: no trajectory store at {os.fspath(path)!r} (missing trajectory.json)")
    with open(meta_path) as f:
        layout = json.load(f)
    return layout, DirectoryStore(path, layout)
