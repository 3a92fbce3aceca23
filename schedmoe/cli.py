"""The `schedmoe` command line."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .bench import BenchConfig, format_table, run, save_json


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time forward + backward of one MoE layer on local ranks",
                       description="Times forward + backward steps of one MoE layer. Without "
                       "torchrun it spawns one rank per GPU (NCCL) or 4 CPU ranks (gloo).")
    defaults = BenchConfig()
    p.add_argument("--ranks", type=int, default=None,
                   help="local ranks to spawn (default: one per GPU, else 4)")
    for f in fields(BenchConfig):
        if f.name == "layer_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name),
                       help=f"(default: {getattr(defaults, f.name)})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="schedmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "bench":
        cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)
                             if f.name != "layer_options"})
        summary = run(cfg, ranks=args.ranks, timeout=args.timeout)
        if int(os.environ.get("RANK", 0)) == 0:
            print(format_table(summary))
            if args.json:
                save_json(summary, args.json)
                print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
