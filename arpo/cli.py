"""The `arpo` command.

    arpo --help
    arpo bench token-stats [--device cuda] [--quick]
    arpo bench --list

Each subcommand lives in its own small function; heavy imports happen inside them so `arpo --help` is instant.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_bench(args: argparse.Namespace) -> int:
    from arpo.bench import registry

    if args.list or not args.workload:
        for name, doc in registry.describe().items():
            print(f"{name:20s} {doc}")
        return 0
    return registry.run_cli(args.workload, device=args.device, quick=args.quick, out=args.out, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arpo", description="ARPO: train and decode tool-using LLM agents with entropy-adaptive tree rollouts."
    )
    from arpo import __version__

    parser.add_argument("--version", action="version", version=f"arpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="run throughput/memory benchmarks and print a comparison table")
    bench.add_argument("workload", nargs="?", help="benchmark to run (see --list)")
    bench.add_argument("--list", action="store_true", help="list the available benchmarks")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    bench.add_argument("--out", default=None, help="write the results as JSON to this path")
    bench.add_argument("--only", default=None, help="run only the workloads whose label contains this text")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
