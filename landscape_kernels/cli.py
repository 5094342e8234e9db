"""The ``landscape-kernels`` command."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="landscape-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="show the active backends (compiled CPU / CUDA, reference), torch, threads, GPU")
    p_info.add_argument("--json", action="store_true", help="print the information as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
