"""The crash-safe chunked stores of weight trajectories.

``TrajectoryRecorder`` (``trajectory.recorder``) hands its rows to a store in chunks. The store is in
memory (``MemoryStore``) or a directory on disk (``DirectoryStore``):

    DIR/trajectory.json       layout: parameter names and shapes, dtype, chunk size, every
    DIR/chunk_000000.npz      steps (T_c,) int64, snapshots (T_c, N), sha256 of both (uint8[32])

Chunks are plain numpy archives (never pickle), written to ``*.tmp``, flushed to disk and renamed, so a
chunk file either is complete or does not exist: a run killed at any moment loses at most the rows not
yet flushed. A writer holds an exclusive lock on ``DIR/writer.lock`` (``flock``; the system drops it
when the process dies, even by SIGKILL), so a second writer is refused and readers (``open_trajectory``)
never touch what a live writer owns. A leftover ``*.tmp`` (the torn chunk of a killed run) is reported
and removed when a writer reopens the store; reading checks each chunk's checksum and shape and names
a corrupt chunk's file.
"""
import hashlib
import json
import os
import warnings
import weakref

try:
    import fcntl
except ImportError:  # not on Windows: no lock, a second writer is not detected there
    fcntl = None

import numpy as np
import torch

FORMAT = "landscape_kernels.trajectory"
VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


LOCK_FILE = "writer.lock"


class CorruptChunkError(RuntimeError):
    """A chunk file whose bytes do not match its checksum (or cannot be parsed)."""


class StoreLockedError(RuntimeError):
    """Another live process is writing the store."""


def read_layout(meta_path):
    """The layout in a store's trajectory.json; a damaged file is a ValueError naming it."""
    try:
        with open(meta_path) as f:
            stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: not a readable trajectory layout ({exc})") from exc
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a landscape_kernels trajectory store")
    missing = [k for k in ("names", "shapes", "dtype") if k not in stored]
    if missing or stored["dtype"] not in DTYPES:
        raise ValueError(f"{meta_path}: the layout lacks {missing or ['a valid dtype']}; the file is damaged")
    return stored


def _writable_directory(path):
    """Make ``path`` a directory this process can write, or raise a ValueError saying why not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"store {path!r} is a file; expected a directory for the trajectory store")
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ValueError(f"store {path!r}: a part of the path is a file, not a directory ({exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"store {path!r}: the directory is not writable; choose another store path")


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

    def __init__(self, path, layout, mode="w"):
        """``mode`` "w": the store a recorder writes (made if missing, locked); "r": read only."""
        if mode not in ("r", "w"):
            raise ValueError(f"DirectoryStore: mode must be 'r' or 'w', got {mode!r}")
        self.path, self.mode = os.fspath(path), mode
        self.torn_chunks = []
        self._lock = None
        meta_path = os.path.join(self.path, "trajectory.json")
        self._superseded = False
        if mode == "w":
            _writable_directory(self.path)
            self._lock = _acquire_lock(self)
        if os.path.exists(meta_path):
            stored = read_layout(meta_path)
            for key in ("names", "shapes", "dtype", "chunk_size", "every"):
                if key in layout and key in stored and stored[key] != layout[key]:
                    raise ValueError(f"store {self.path!r} holds a different trajectory: its {key} is {stored[key]}, "
                                     f"this recorder's is {layout[key]}; use another path (or the same settings)")
            if mode == "w":
                self._remove_torn_chunks()
        elif mode == "w":
            tmp = meta_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"format": FORMAT, "version": VERSION, **layout}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, meta_path)
            _fsync_dir(self.path)
        else:
            raise FileNotFoundError(f"no trajectory store at {self.path!r} (missing trajectory.json)")
        self.dtype = DTYPES[layout["dtype"]]
        self.width = sum(int(np.prod(s)) for s in layout["shapes"])
        self._files = sorted(n for n in os.listdir(self.path) if n.startswith("chunk_") and n.endswith(".npz"))
        for i, name in enumerate(self._files):
            if name != self._chunk_name(i):
                raise CorruptChunkError(f"{os.path.join(self.path, name)}: chunk files are not numbered 0..{len(self._files) - 1}"
                                        f" (expected {self._chunk_name(i)}); a chunk is missing")

    def _remove_torn_chunks(self):
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".tmp"):  # a chunk being written when the last writer was killed (it holds the lock now)
                self.torn_chunks.append(name)
                os.remove(os.path.join(self.path, name))
        if self.torn_chunks:
            warnings.warn(f"trajectory store {self.path!r}: discarded torn chunk(s) {self.torn_chunks} "
                          "left by an interrupted run", RuntimeWarning, stacklevel=4)

    def close(self):
        """Release the writer's lock (also when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        _WRITERS.pop(os.path.realpath(self.path), None)

    @staticmethod
    def _chunk_name(index):
        return f"chunk_{index:06d}.npz"

    def append(self, steps, snapshots):
        if self.mode != "w":
            raise ValueError(f"store {self.path!r} was opened read-only")
        if self._superseded:
            raise StoreLockedError(f"store {self.path!r}: a newer recorder in this process took it over; "
                                   "this one can no longer write")
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
        if snapshots.ndim != 2 or snapshots.shape[1] != self.width or steps.shape != (snapshots.shape[0],):
            raise CorruptChunkError(f"{path}: snapshots of shape {snapshots.shape} and steps of shape {steps.shape}; "
                                    f"the store's layout says rows of {self.width} numbers, one step each")
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


_WRITERS = {}  # real path -> weak reference to the store this process writes it with


def _acquire_lock(store):
    """The writer's lock on ``store``'s directory. A store this process already writes there is taken
    over (a recorder made again after an error in a notebook); another process's is refused."""
    path = store.path
    key = os.path.realpath(path)
    earlier = _WRITERS.get(key)
    earlier = earlier() if earlier is not None else None
    _WRITERS[key] = weakref.ref(store)
    if earlier is not None and earlier._lock is not None:
        earlier._superseded = True
        lock, earlier._lock = earlier._lock, None
        return lock
    if fcntl is None:
        return None
    lock = open(os.path.join(path, LOCK_FILE), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        _WRITERS.pop(key, None)
        raise StoreLockedError(f"store {path!r} is being written by another live process (it holds {LOCK_FILE}); "
                               "read it with open_trajectory, or record into another path") from None
    return lock


def open_trajectory(path):
    """Read-only access to a store on disk, also while a recorder is writing it: (layout dict,
    DirectoryStore). It sees the chunks complete when it was opened, and deletes nothing."""
    meta_path = os.path.join(os.fspath(path), "trajectory.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"open_trajectory: no trajectory store at {os.fspath(path)!r} (missing trajectory.json)")
    layout = read_layout(meta_path)
    return layout, DirectoryStore(path, layout, mode="r")
