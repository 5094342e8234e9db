"""The ``landscape-kernels`` command: ``info`` (which backends are active), ``analyse`` (the noise and
curvature report of your own model) and ``reproduce JOB`` (a published analysis into a report folder;
every job's flags come from its config, see ``reproduce.job``)."""
import argparse
import json
import signal
import sys

from .reproduce import (analyse, dpsgd, duality, effective_gan, escape_rate, flat_valley, forgetting, noise_curvature,
                        nsgd, phases, sharpest_directions, variance_flatness)
from .reproduce.torchrun import finish_process

JOBS = {job.name: job for job in (variance_flatness.JOB, forgetting.JOB, sharpest_directions.JOB, nsgd.JOB,
                                  noise_curvature.JOB, escape_rate.JOB, duality.JOB, phases.JOB,
                                  flat_valley.JOB, effective_gan.JOB, dpsgd.JOB)}


def build_parser():
    parser = argparse.ArgumentParser(prog="landscape-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="show the active backends (compiled CPU / CUDA, reference), torch, threads, GPU")
    p_info.add_argument("--json", action="store_true", help="print the information as JSON")
    analyse.JOB.add_parser(sub)
    p_reproduce = sub.add_parser("reproduce", help="reproduce a published analysis into a report folder",
                                 description="Reproduce a published analysis into a report folder (report.md, "
                                             "figures, summary.json); docs/reproductions/ describes each job.")
    jobs = p_reproduce.add_subparsers(dest="job", required=True)
    for job in JOBS.values():
        job.add_parser(jobs)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .kernels.info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    job = analyse.JOB if args.command == "analyse" else JOBS[args.job]
    return finish_process(run_job(job, args))  # under torchrun: exits here, past a teardown that can abort


def run_job(job, args):
    try:
        return job.main(args)
    except (OSError, ValueError) as exc:  # a missing or damaged file, a bad setting: one clear line
        print(f"landscape-kernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what was recorded is kept
        print(f"landscape-kernels: interrupted ({exc or 'SIGINT'}); everything recorded is kept in {args.out}: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
