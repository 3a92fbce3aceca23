"""The `schedmoe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
    p.add_argument("--local-size", type=int, default=None,
                   help="ranks per node for hierarchical A2A (default: LOCAL_WORLD_SIZE)")
    p.add_argument("--emulate-nodes", type=int, default=0, metavar="N",
                   help="run on N emulated nodes (network namespaces, root only) with --ranks "
                   "ranks each (default 2)")
    p.add_argument("--inter-node-rate", default="1gbit",
                   help="tc rate of each emulated node's link (default: 1gbit)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="schedmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "bench":
        cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)
                             if f.name != "layer_options"})
        if args.local_size:
            cfg.layer_options["local_size"] = args.local_size
        if args.emulate_nodes:
            summary = _bench_emulated(args, argv if argv is not None else sys.argv[1:])
        else:
            summary = run(cfg, ranks=args.ranks, timeout=args.timeout)
        if int(os.environ.get("RANK", 0)) == 0:
            print(format_table(summary))
            if args.json:
                save_json(summary, args.json)
                print(f"saved {args.json}")
    return 0


def _bench_emulated(args: argparse.Namespace, argv: list[str]) -> dict:
    """Re-run this bench command under torchrun on every node of an emulated cluster."""
    from .emulate import ClusterSpec, EmulatedCluster

    forwarded = _strip_options(argv, {"--emulate-nodes": 1, "--inter-node-rate": 1, "--ranks": 1,
                                      "--json": 1})
    spec = ClusterSpec(nodes=args.emulate_nodes, ranks_per_node=args.ranks or 2,
                       rate=args.inter_node_rate)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        with EmulatedCluster(spec) as cluster:
            cluster.launch(["schedmoe.cli", *forwarded, "--json", out], timeout=args.timeout)
        with open(out) as f:
            summary = json.load(f)
    summary["emulated"] = {"nodes": spec.nodes, "ranks_per_node": spec.ranks_per_node,
                           "rate": spec.rate}
    return summary


def _strip_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """`argv` without the given options (and their values, `--opt v` or `--opt=v`)."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in arg else options[name]
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
