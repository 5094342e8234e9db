"""``TrajectoryRecorder``: snapshots of chosen parameters along training, into a crash-safe store.

The chosen parameters are copied (flattened in a fixed order into rows of N numbers) at the steps it is
asked to record, into a buffer of ``chunk_size`` rows that is handed to the store (``trajectory.store``)
when full: in memory, or a directory of checksummed chunk files that survives a killed run.
"""
import torch

from ..kernels.checks import all_finite
from .store import DTYPES, DirectoryStore, MemoryStore


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
        params: names to record (default all), e.g. ``["2.weight"]`` for W2 of the Feng & Tu 2021 network.
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
        if dtype not in DTYPES.values():
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
        """Flush, and release a directory store's writer lock."""
        self.flush()
        if hasattr(self.store, "close"):
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        if last is None:
            return X
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise ValueError(f"snapshots: last must be None or an int >= 0, got {last!r}")
        return X[X.shape[0] - min(last, X.shape[0]) :]

    def unflatten(self, row):
        """A (N,) row back to a dict name -> tensor of the recorded shapes."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(row, self.sizes), self.shapes)}
