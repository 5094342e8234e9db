"""Timing and memory helpers shared by the benchmarks."""
import statistics
import time


def timed(fn, repeats):
    """(result of the last call, median wall time over ``repeats`` calls)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory added inside the block (Linux: the VmHWM mark is reset on entry through
    /proc/self/clear_refs). ``added`` is None where that is not available."""

    def __enter__(self):
        self.added = None
        self._start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        if self._start is not None and peak is not None:
            self.added = max(peak - self._start, 0) * 1024
        return False


class Counted:
    """A function that counts its calls (``n``): the matrix-vector products an eigensolver asked for."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, v):
        self.n += 1
        return self.fn(v)
