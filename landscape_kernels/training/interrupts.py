"""Interruptions only between steps: a Ctrl-C (SIGINT) or SIGTERM that arrives while ``SGDTrainer`` is
inside a step or an epoch end is held until that step is complete, then raised as ``TrainingInterrupted``.

Without this, an interruption between a callback's snapshot and the optimizer's update saves a
checkpoint whose callbacks are one step ahead of the model, and ``--resume`` records that step twice.
A second signal while one is held raises at once (an impatient user wins), and the state is marked
torn so that no checkpoint of it is written. Only default handlers are replaced, and only in the main
thread (the only one Python delivers signals to); a program's own handlers are left alone.
"""
import contextlib
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received during training; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def _default_handler(signum):
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


class StepBoundary:
    """``with StepBoundary() as b: ... with b.step(): <one step>``: signals inside ``step()`` wait for its end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending = None  # the held signal
        self.torn = False  # a second signal broke off a step: the state is inconsistent
        self._inside = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is _default_handler(signum):
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._inside and self.pending is None:
            self.pending = signum  # raised when the step is complete
            return
        if self._inside:
            self.torn, self.pending = True, None
            raise TrainingInterrupted(signum, f"{name} twice: training stopped inside a step")
        raise TrainingInterrupted(signum, f"{name}: training interrupted")

    @contextlib.contextmanager
    def step(self, raise_pending=True):
        """Signals arriving inside are held; with ``raise_pending`` a held one is raised at the end."""
        outer = self._inside
        self._inside = True
        try:
            yield
        finally:
            self._inside = outer
        if raise_pending and not outer and self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum, f"{signal.Signals(signum).name}: training interrupted after step")
