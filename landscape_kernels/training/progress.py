"""Progress of long loops, readable wherever it goes.

On a terminal, a tqdm bar (tqdm is in the ``report`` extra); when stderr is not a terminal (CI, a log
file, ``nohup``) a bar's carriage-return updates would pile up (a 1,000-epoch run wrote about 1 MB of
them into a log), so ``Progress`` writes one plain line each time another ``percent_step`` percent is
done, and one at the end.
"""
import sys
import time


class Progress:
    """``update(n, **postfix)`` after each unit of work; ``close()`` (or ``with``) at the end.

    Args:
        total: units in all; initial: units already done (a resumed run).
        desc, unit: the label and the unit's name ("SGD", "epoch").
        stream: where to write (default ``sys.stderr``); a bar only when it is a terminal.
        percent_step: the percentage between two lines when it is not a terminal.
    """

    def __init__(self, total, initial=0, desc="", unit="it", stream=None, percent_step=5):
        self.total, self.done, self.desc, self.unit = max(int(total), 0), int(initial), desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.percent_step = percent_step
        self._start = time.perf_counter()
        self._next = self._next_percent(self._percent())
        self._postfix = ""
        self._last_line_at = self.done  # nothing to report yet
        self._bar = self._terminal_bar() if _is_terminal(self.stream) else None

    def _terminal_bar(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # without tqdm, plain lines serve a terminal too
            return None
        return tqdm(total=self.total, initial=self.done, unit=self.unit, desc=self.desc, file=self.stream)

    def _percent(self):
        return 100.0 * self.done / self.total if self.total else 100.0

    def _next_percent(self, percent):
        return (int(percent // self.percent_step) + 1) * self.percent_step

    def update(self, n=1, **postfix):
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix)
            return
        self._postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._percent() >= self._next or self.done >= self.total:
            self._line()
            self._next = self._next_percent(self._percent())

    def _line(self):
        elapsed = time.perf_counter() - self._start
        tail = f", {self._postfix}" if self._postfix else ""
        self.stream.write(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({self._percent():.0f} %), "
                          f"{elapsed:.0f} s{tail}\n")
        self.stream.flush()
        self._last_line_at = self.done

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self.done != self._last_line_at:
            self._line()  # where an interrupted or shortened run stopped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
