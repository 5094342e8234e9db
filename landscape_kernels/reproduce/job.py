"""The frame every ``landscape-kernels reproduce`` job runs in.

A job is a subclass of ``Job`` that names itself and supplies its analysis and its report:

- its docstring is the ``--help`` line; ``name`` is the command, ``config`` a dataclass whose fields
  declared with ``option(...)`` become the job's flags (``--field-name``), and whose ``resolved()``
  applies ``--quick`` and checks the values (a bad value is a ``ValueError`` the command prints as one
  line);
- ``compute(cfg, ctx)``: the analysis; returns the summary dict, or (summary, arrays) when the report
  needs arrays that do not belong in ``summary.json``;
- ``report``: the writer ``report(out, summary, arrays)``; ``headline(summary)``: the line printed at
  the end.

``Job.run(cfg, out, resume, progress, log)`` does everything else: resolves the config, makes the
output folder, times the stages (``ctx.timer``), adds the library version, the config and the total
time to the summary, writes the report and then ``summary.json`` (atomically). ``JobContext`` carries
what a resumable analysis needs: ``ctx.reuse(path, compute)`` for a result written once per run folder
and reused by ``--resume``, and ``ctx.stages(filename)`` for named results kept in one file as each
finishes. Nothing a job records is lost when it is interrupted: every result file is written to a
temporary name and renamed.
"""
import argparse
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from ..training.state_files import jsonable, read_json, write_json  # noqa: F401  (re-exported for the jobs)
from ..version import __version__

DATASETS = ("digits", "mnist")
JOB_FILE = "job.json"  # in every run folder: which job wrote it, with which settings
RESUME_MAY_CHANGE = {"device", "data_dir"}  # settings a resumed run may change (where it runs, where the data is)
DATA_DIR_HELP = "ROOT holding MNIST/raw (default $LANDSCAPE_KERNELS_DATA or ~/.cache/landscape_kernels)"


# ------------------------------------------------------------------------------------- config
def option(default, help, type=None, choices=None, minimum=None):
    """A config field that is also a command-line flag: ``--name-with-dashes``. Tuples are given as
    comma lists of ``type`` (default: the type of the default's first element); ``False`` defaults are
    switches. A number (or each number of a list) must be finite and positive, or at least ``minimum``
    when one is given (``minimum=0`` for seeds and counts that may be zero); ``check_options`` says so."""
    return field(default=default, metadata={"cli": {"help": help, "type": type, "choices": choices,
                                                    "minimum": minimum}})


def flag_name(name):
    return "--" + name.replace("_", "-")


def check_options(cfg):
    """Every numeric option of ``cfg`` finite and within its bound (``option(minimum=...)``, default
    positive); the first that is not is a ``ValueError`` naming the field and its flag."""
    for f in fields(cfg):
        spec = f.metadata.get("cli")
        value = getattr(cfg, f.name)
        if spec is None or value is None or isinstance(value, (bool, str)):
            continue
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            low = spec["minimum"]
            if not math.isfinite(v) or (v < low if low is not None else v <= 0):
                bound = "positive" if low is None else f">= {low}"
                what = "every value of " if isinstance(value, tuple) else ""
                raise ValueError(f"{what}{f.name} ({flag_name(f.name)}) must be finite and {bound}, got {v!r}")
    device = getattr(cfg, "device", None)
    if isinstance(device, str):
        check_device(device)


def check_device(device):
    """``device`` a torch device this machine has (a clear error for ``cuda`` without a GPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device (--device) must be a torch device such as cpu or cuda, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device (--device) is {device!r}, but torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device (--device) is {device!r}, but this machine has {torch.cuda.device_count()} GPU(s)")


def dataset_option(default, help="digits: the embedded scikit-learn 8x8 digits (offline); mnist: the paper's data"):
    """The ``--dataset`` flag every job has."""
    return option(default, help, choices=DATASETS)


def data_dir_option():
    """The ``--data-dir`` flag every job has."""
    return option(None, DATA_DIR_HELP, type=str)


def _value_type(f, spec):
    if spec["type"] is not None:
        return spec["type"]
    sample = f.default[0] if isinstance(f.default, tuple) and f.default else f.default
    if sample is None or sample is MISSING:
        raise TypeError(f"option {f.name!r}: give type= for a default of {f.default!r}")
    return type(sample)


def comma_list(item_type):
    """An argparse type: a comma list of ``item_type`` values as a tuple."""

    def parse(text):
        try:
            return tuple(item_type(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma list of {item_type.__name__}, got {text!r}") from exc

    parse.__name__ = f"comma list of {item_type.__name__}"
    return parse


def add_config_arguments(parser, config_class):
    """One flag per ``option`` field of ``config_class``, its default the field's default."""
    for f in fields(config_class):
        spec = f.metadata.get("cli")
        if spec is None:
            continue
        flag = flag_name(f.name)
        if f.default is False:
            parser.add_argument(flag, dest=f.name, action="store_true", help=spec["help"])
            continue
        item = _value_type(f, spec)
        is_list = isinstance(f.default, tuple)
        shown = ",".join(map(str, f.default)) if is_list else f.default
        parser.add_argument(flag, dest=f.name, type=comma_list(item) if is_list else item, default=f.default,
                            choices=spec["choices"], metavar="A,B,..." if is_list else None,
                            help=spec["help"] + ("" if f.default is None else f" (default: {shown})"))


def config_from_args(config_class, args):
    """The config the parsed command line asks for (fields without a flag keep their defaults)."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class) if "cli" in f.metadata})


# ------------------------------------------------------------------------------------- files
class StageResults(dict):
    """Named results kept in one JSON file, rewritten as each finishes; with ``resume`` the file of an
    earlier run is read back and its finished stages are not run again."""

    def __init__(self, path, resume, log):
        super().__init__(read_json(path) if resume and os.path.isfile(path) else {})
        self.path, self.log = path, log
        self.earlier = set(self)  # the stages an earlier invocation finished

    def run(self, name, compute):
        """The result of stage ``name``: the kept one, or ``compute()`` (then kept)."""
        if name in self:
            if name in self.earlier:  # said once per stage
                self.earlier.discard(name)
                self.log(f"{name}: done before, reusing it")
            return self[name]
        self[name] = compute()
        write_json(self.path, dict(self))
        return self[name]


def timed(compute):
    """``compute`` made to add the seconds it took to the dict it returns: a part's own time, kept with
    it when ``--resume`` reuses the part."""
    def run():
        t = time.perf_counter()
        return {**compute(), "seconds": time.perf_counter() - t}

    return run


def strictly_monotone(values, increasing=True):
    """Whether ``values`` rise (or fall) strictly from each to the next: the trend checks of the reports."""
    return all((b > a) if increasing else (b < a) for a, b in zip(values, values[1:]))


@dataclass
class StageTimer:
    """Seconds per named stage, summed over repeated entries: ``with timer("training"): ...``."""

    seconds: dict = field(default_factory=dict)

    def __call__(self, name):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


@dataclass
class JobContext:
    """What ``Job.compute`` gets besides its config: the output folder and how the job was started."""

    out: str
    resume: bool = False
    progress: bool = False
    log: object = print
    checkpoint_seconds: float = 60.0  # passed to every SGDTrainer the job makes
    timer: StageTimer = field(default_factory=StageTimer)
    started: float = field(default_factory=time.perf_counter)

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def elapsed(self):
        return time.perf_counter() - self.started

    def reuse(self, path, compute, label=None):
        """The JSON result at ``path``: read back when resuming and it exists, else ``compute()``,
        written there (the run folder is made first)."""
        if self.resume and os.path.isfile(path):
            self.log(f"{label or os.path.dirname(path)}: done before, reusing {path}")
            return read_json(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        result = compute()
        write_json(path, result)
        return result

    def resume_training(self, trainer):
        """With ``--resume``, continue ``trainer`` from its checkpoint when one exists (else start afresh)."""
        if self.resume and trainer.checkpoint and os.path.isfile(trainer.checkpoint):
            trainer.resume()
            self.log(f"resumed from {trainer.checkpoint} at epoch {trainer.epoch}, step {trainer.step}")
        return trainer

    def stages(self, filename):
        """A ``StageResults`` kept in ``OUT/filename``."""
        return StageResults(self.path(filename), self.resume, self.log)


# ------------------------------------------------------------------------------------- jobs
class Job:
    """A ``reproduce`` job (see the module docstring). A subclass's docstring is its ``--help`` line; it
    sets ``name``, ``config`` and ``report`` (the writer ``report(out, summary, arrays)``) and implements
    ``compute`` and ``headline``."""

    name = None
    config = None
    report = None
    docs = None  # the job's page under docs/reproductions/ (default: the job's name)
    page = None  # or the path of its page when it is not a reproduction
    trains = True  # whether it trains (and so has --checkpoint-every)

    @property
    def help(self):
        return " ".join(type(self).__doc__.split())

    def compute(self, cfg, ctx):
        raise NotImplementedError

    def write_report(self, out, summary, arrays):
        type(self).report(out, summary, arrays)  # a plain function kept on the class: no self

    def headline(self, summary):
        raise NotImplementedError

    def writes_files(self):
        """Whether this process writes the folder (False on the ranks other than 0 of a ``torchrun`` job)."""
        return True

    def run(self, cfg, out, resume=False, progress=False, log=print, checkpoint_seconds=60.0):
        """The whole job into the folder ``out``; returns the summary (also written as summary.json).
        ``checkpoint_seconds``: training state is saved at the first epoch end after that many seconds
        (and on an interruption); a killed run loses at most that much."""
        check_options(cfg)  # as given (--quick may raise some values), then as run
        cfg = cfg.resolved()
        check_options(cfg)
        if not float(checkpoint_seconds) >= 0:
            raise ValueError(f"checkpoint_seconds (--checkpoint-every) must be >= 0, got {checkpoint_seconds!r}")
        out = os.fspath(out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out!r} is a file; expected a folder for the report (it is made if missing)")
        writer = self.writes_files()
        if writer:
            os.makedirs(out, exist_ok=True)
        self.claim_folder(cfg, out, resume, write=writer)
        if not writer:  # one rank's lines and bars are enough
            progress, log = False, (lambda line: None)
        ctx = JobContext(out, resume, progress, log, checkpoint_seconds=float(checkpoint_seconds))
        result = self.compute(cfg, ctx)
        summary, arrays = result if isinstance(result, tuple) else (result, {})
        summary = {"library_version": __version__, "config": asdict(cfg), **summary}
        summary.setdefault("seconds", ctx.elapsed())
        if ctx.timer.seconds:
            summary["timings_s"] = ctx.timer.seconds
        if not writer:
            return summary
        with ctx.timer("report"):
            self.write_report(out, summary, arrays)
        write_json(os.path.join(out, "summary.json"), summary)
        return summary

    def claim_folder(self, cfg, out, resume, write=True):
        """Write ``OUT/job.json`` (this job and its settings; only checked without ``write``). With
        ``resume``, a folder another job, or this job with other settings, wrote first is refused:
        resuming it would mix two runs."""
        path = os.path.join(out, JOB_FILE)
        settings = json.loads(json.dumps(asdict(cfg), default=jsonable))
        if resume and os.path.isfile(path):
            earlier = read_json(path)
            if earlier.get("job") != self.name:
                raise ValueError(f"--resume: {out!r} holds a run of the job {earlier.get('job')!r}, not {self.name!r}; "
                                 "choose another --out")
            changed = [f"{flag_name(k)} {earlier['config'].get(k)!r} -> {v!r}" for k, v in settings.items()
                       if k not in RESUME_MAY_CHANGE and earlier["config"].get(k, v) != v]
            if changed:
                raise ValueError(f"--resume: {out!r} was run with other settings ({'; '.join(changed)}); resume "
                                 "with the same settings, or run into another --out")
        if write:
            write_json(path, {"job": self.name, "library_version": __version__, "config": settings})

    # -------------------------------------------------------------------------- command line
    def add_parser(self, subparsers):
        """This job's ``landscape-kernels reproduce NAME`` parser."""
        if self.page:
            epilog = f"Every number and figure explained, with a worked example: {self.page}"
        else:
            epilog = ("Settings, measured results against the paper and what does not reproduce: "
                      f"docs/reproductions/{self.docs or self.name}.md")
        p = subparsers.add_parser(self.name, help=self.help, description=self.help, epilog=epilog)
        add_config_arguments(p, self.config)
        out = os.path.join("runs", self.name)
        p.add_argument("--out", default=out, help=f"report folder (default: {out})")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT, reusing what it finished")
        p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
        if self.trains:
            p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                           help="save the training state at the first epoch end after this many seconds; a killed run "
                                "loses at most that much (default: 60)")
        else:
            p.set_defaults(checkpoint_every=60.0)
        self.add_arguments(p)
        return p

    def add_arguments(self, parser):
        """Flags beyond the config's (none by default)."""

    def main(self, args):
        """Run from parsed command-line arguments and print where the report is; returns the exit code."""
        summary = self.run(config_from_args(self.config, args), args.out, resume=args.resume,
                           progress=not args.no_progress, checkpoint_seconds=args.checkpoint_every)
        if self.writes_files():
            print(f"report: {args.out}/report.md  ({self.headline(summary)})")
        return 0
