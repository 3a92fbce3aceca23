"""The `schedmoe` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from .bench import BenchConfig, format_table, run, save_json, save_trace
from ..errors import ConfigError, RegistryError
from .launch import MAX_LOCAL_RANKS, planned_world
from ..control.validation import number, one_of

# What each option means (argparse adds the default).
HELP = {
    # the layer (bench, train, simulate)
    "tokens": "tokens per rank per step", "model_dim": "model (hidden state) dimension M",
    "hidden_dim": "each expert's hidden dimension H",
    "num_experts": "experts E in total (each rank holds E / ranks)",
    "top_k": "experts each token goes to", "expert": "expert form: ffn, swiglu or clamped_glu",
    "capacity_factor": "slots per expert = factor * top_k * tokens / experts; 0: dropless",
    "a2a": "all-to-all algorithm: nccl (flat), 2dh (hierarchical) or pipe (Pipe-A2A)",
    "compressor": "codec of the exchanged payload: none, fp16, bf16, fp8, int8, int8+ef, zstd",
    "scheduler": "sequential, pipeline (overlapped chunks, see --degree) or adaptive",
    "degree": "chunks of the pipeline scheduler", "dtype": "float32, float16 or bfloat16",
    "steps": "timed steps (train: the total number of optimizer steps)",
    "warmup": "untimed steps first", "seed": "random seed (the same on every rank)",
    # train
    "ep_size": "ranks per expert-parallel group; 0: all ranks",
    "batch": "sequences per global batch", "seq": "tokens per sequence",
    "dim": "model dimension", "layers": "transformer blocks", "heads": "attention heads",
    "lr": "AdamW learning rate", "aux_weight": "weight of the balance loss",
    "clip": "global gradient-norm clip", "recipe": "data parallelism: ddp or fsdp2",
    "checkpoint_every": "steps between checkpoints (with --checkpoint-dir)",
    # simulate: the workload
    "dtype_bytes": "bytes per activation value (2: bf16)",
    "ragged": "exchange only the kept rows (true) or padded capacity (false)",
    "shared_hidden_dim": "hidden dimension of a shared expert; 0: none",
    "expert_load": "each expert's share of the pairs: comma-separated numbers, or a JSON file "
                   "(a list, or a `schedmoe train --json` record: its first layer's load); "
                   "empty: balanced",
    "placement": "where the experts go: static (E / W a rank) or planned (balanced by the "
                 "placement planner)",
    "redundant": "with --placement planned: replica slots per rank",
    # simulate: the cluster
    "nodes": "nodes in the EP group", "ranks_per_node": "ranks (GPUs) per node",
    "intra_gbyte_s": "intra-node bandwidth per rank, GB/s",
    "intra_latency_us": "intra-node latency per message, us",
    "intra_knee_mb": "message size at which intra-node links reach half their efficiency, MB",
    "intra_large_efficiency": "intra-node efficiency of large messages (0-1)",
    "nic_gbit": "bandwidth of one NIC, Gbit/s", "nics_per_node": "NICs per node",
    "inter_latency_us": "inter-node latency per message, us",
    "inter_knee_mb": "message size at which inter-node links reach half their efficiency, MB",
    "inter_large_efficiency": "inter-node efficiency of large messages (0-1)",
    "bus_gbyte_s": "host bus (PCIe) bandwidth per node, GB/s",
    "gemm_tflops": "expert GEMM rate per rank, TFLOP/s",
    "gemm_half_rows": "rows at which a GEMM reaches half its rate",
    "memory_gbyte_s": "memory bandwidth per rank (codecs, copies), GB/s",
    "task_overhead_us": "fixed cost of launching one op, us",
    "backward_factor": "backward expert time / forward expert time",
    "compute_slowdown": "compute slowdown while communication runs (interference)",
    "comm_slowdown": "communication slowdown while compute runs (interference)",
}


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
                       help=f"{HELP[f.name]} (default: {getattr(defaults, f.name)})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    p.add_argument("--trace", metavar="PREFIX",
                   help="save rank 0's last step as PREFIX.json (Chrome trace) and PREFIX.png")
    p.add_argument("--local-size", type=int, default=None,
                   help="ranks per node for hierarchical A2A (default: LOCAL_WORLD_SIZE)")
    p.add_argument("--emulate-nodes", type=int, default=0, metavar="N",
                   help="run on N emulated nodes (network namespaces, root only) with --ranks "
                   "ranks each (default 2)")
    p.add_argument("--inter-node-rate", default="1gbit",
                   help="tc rate of each emulated node's link (default: 1gbit)")
    p.add_argument("--pin-cores", action="store_true",
                   help="with --emulate-nodes: each node's ranks on cores of their own (taskset;"
                   " --emulate-nodes 2 --ranks 1 gives every rank a core on a 2-core machine)")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_dataclass_options(p: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        kind = _bool if isinstance(value, bool) else _numbers if isinstance(value, tuple) \
            else type(value)
        p.add_argument("--" + prefix + f.name.replace("_", "-"), dest=prefix + f.name,
                       type=kind, default=value, help=f"{HELP[f.name]} (default: {value})")


def _numbers(text: str) -> tuple[float, ...]:
    """Numbers from "1,2,3" or a JSON file: a list, or a train record's first layer's load."""
    try:
        path = Path(text)
        if "," not in text and path.is_file():
            found = json.loads(path.read_text())
            if isinstance(found, dict) and "load" in found:  # a `schedmoe train --json` record
                found = next(iter(found["load"].values()))["tokens"]
            return tuple(float(v) for v in found)
        return tuple(float(v) for v in text.split(",") if v.strip())
    except (ValueError, TypeError, KeyError, StopIteration, AttributeError, OSError) as exc:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 3,1,1,1 or a JSON file of them, got {text!r} ({exc})")


def _cluster_flags() -> list[str]:
    """The Cluster fields settable from the command line: the numbers (tables such as `codecs`
    and `a2a_call_us` live in cluster files)."""
    from ..sim import Cluster

    return [f.name for f in fields(Cluster)
            if isinstance(getattr(Cluster(), f.name), (int, float))]


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    from ..sim import ALGORITHMS, Cluster, Workload, preset_names

    p = sub.add_parser("simulate", help="predict a layer step on a described cluster",
                       description="Simulates forward + backward of one MoE layer for every "
                       "(A2A algorithm, codec, pipeline degree) on a cluster (a preset, a JSON "
                       "file, or flags; flags override the file), optionally calibrated on "
                       "measured steps first; prints the best candidates.")
    p.add_argument("--cluster", metavar="NAME|PATH",
                   help=f"a preset ({', '.join(preset_names())}) or a cluster JSON file "
                   "(default: the Cluster defaults, H100 nodes)")
    p.add_argument("--calibrate", metavar="RESULTS.json",
                   help="fit the cluster's constants to measured steps first (records of "
                   "experiments/sim_validation.py --measure or schedule_bench.py); the "
                   "cluster flags below apply after the fit, so --nodes asks about a larger "
                   "cluster than the one measured")
    p.add_argument("--layout", help="with --calibrate: which layout of a multi-layout file")
    p.add_argument("--save-cluster", metavar="PATH", help="write the (calibrated) cluster JSON")
    for name in _cluster_flags():
        default = getattr(Cluster(), name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       type=type(default),
                       help=f"{HELP[name]} (default: the cluster's; {default})")
    _add_dataclass_options(p, Workload)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="A2A algorithms to consider, comma separated (default: all)")
    p.add_argument("--codecs", default="none",
                   help="codecs to consider, comma separated, e.g. none,bf16,fp8,zfp")
    p.add_argument("--degrees", default="1-16",
                   help="pipeline degrees r to consider, e.g. 1-16 or 1,2,4,8")
    p.add_argument("--top", type=int, default=10, help="candidates to print, best first")
    p.add_argument("--trace", metavar="PATH", help="Chrome trace JSON: best vs sequential")
    p.add_argument("--gantt", metavar="PATH", help="Gantt chart PNG: best vs sequential")
    p.add_argument("--json", metavar="PATH", help="every prediction as JSON")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from .train.run import TrainConfig

    p = sub.add_parser("train", help="train a small MoE language model with expert parallelism",
                       description="Trains a small MoE language model (transformer blocks with "
                       "MoELayer FFNs) on Python's standard-library source with EP x DP on local "
                       "ranks (4 gloo ranks, or one per GPU with NCCL) or under torchrun.")
    p.add_argument("--ranks", type=int, default=None,
                   help="local ranks to spawn (default: one per GPU, else 4)")
    _add_dataclass_options(p, TrainConfig)
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save checkpoints to DIR/step-NNNNNN every --checkpoint-every steps and "
                   "at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (any --ranks "
                   "and --ep-size; --steps is the total)")
    p.add_argument("--json", metavar="PATH", help="save the loss curve and tokens/s as JSON")
    p.add_argument("--png", metavar="PATH",
                   help="save the loss curve as a PNG (default: the --json path with .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")


def _train(args: argparse.Namespace) -> None:
    from .train.run import TrainConfig, save_curve, train

    number("train", "--timeout", args.timeout, above=0)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    record = train(cfg, ranks=args.ranks, checkpoint_dir=args.checkpoint_dir,
                   resume=args.resume, progress=not args.no_progress, timeout=args.timeout)
    if int(os.environ.get("RANK", 0)):
        return
    history = record["history"]
    if history:
        rates = sorted(h["tokens_per_s"] for h in history)
        print(f"{record['layout']}: step {history[-1]['step']}, loss {history[-1]['loss']:.4f} "
              f"(first {history[0]['loss']:.4f}), median {rates[len(rates) // 2]:.0f} tokens/s"
              + (f", resumed from {record['resumed_from']}" if record["resumed_from"] else ""))
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"saved {args.json}")
    if png:
        save_curve(record, png)
        print(f"saved {png}")


def _degrees(text: str) -> list[int]:
    """"1-16" or "1,2,4,8": every degree within [1, MAX_DEGREE]."""
    from ..sim.model import MAX_DEGREE

    try:
        if "-" in text:
            lo, hi = map(int, text.split("-"))
            degrees = list(range(lo, hi + 1))
        else:
            degrees = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--degrees takes LO-HI or a comma-separated list, got {text!r}")
    if not degrees or not all(1 <= d <= MAX_DEGREE for d in degrees):
        raise ConfigError(f"--degrees must name degrees in [1, {MAX_DEGREE}], got {text!r}")
    return degrees


def _simulate_cluster(args: argparse.Namespace):
    """The cluster of `schedmoe simulate`: preset or file, calibrated, then the flags."""
    from ..sim import Cluster, calibrate, load_cluster, load_measurements, log_errors

    cluster = load_cluster(args.cluster) if args.cluster else Cluster()
    if args.calibrate:
        records = load_measurements(args.calibrate, args.layout)
        before = log_errors(cluster, records)
        cluster = calibrate(cluster, records)
        after = log_errors(cluster, records)
        within = sum(abs(math.expm1(e)) <= 0.15 for e in after)
        print(f"calibrated on {len(records)} measured steps: median |error| "
              f"{100 * statistics.median(abs(math.expm1(e)) for e in before):.1f}% -> "
              f"{100 * statistics.median(abs(math.expm1(e)) for e in after):.1f}%, "
              f"{within} of {len(records)} within 15%")
    changes = {name: getattr(args, name) for name in _cluster_flags()
               if getattr(args, name) is not None}
    cluster = dataclasses.replace(cluster, **changes)
    cluster.validate()
    if args.save_cluster:
        with open(args.save_cluster, "w") as f:
            json.dump(cluster.to_json(), f, indent=1)
        print(f"saved {args.save_cluster}")
    return cluster


def _simulate(args: argparse.Namespace) -> None:
    from ..sim import ALGORITHMS, Workload, predict, search
    from .trace import save_chrome_trace, save_gantt

    cluster = _simulate_cluster(args)
    workload = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})
    workload.validate()
    algorithms, codecs = args.algorithms.split(","), args.codecs.split(",")
    for algorithm in algorithms:
        one_of("--algorithms", "each", algorithm, ALGORITHMS)
    for codec in codecs:
        cluster.codec(codec)
    number("--top", "the count", args.top, integer=True, low=1)
    ranked = search(workload, cluster, algorithms, codecs, _degrees(args.degrees))
    sequential = predict(workload, cluster, "nccl", "none", 1)
    print(f"{cluster.name}: {cluster.nodes} nodes x {cluster.ranks_per_node} ranks, "
          f"{cluster.nics_per_node} x {cluster.nic_gbit} Gbit/s NICs per node, intra "
          f"{cluster.intra_gbyte_s} GB/s per rank, {cluster.gemm_tflops} TFLOP/s; "
          f"{workload.tokens} tokens/rank, M={workload.model_dim}, H={workload.hidden_dim}, "
          f"E={workload.num_experts}, top-{workload.top_k}, C={workload.capacity()}")
    if workload.expert_load:
        print(f"expert load: the busiest rank gets "
              f"{workload.skew(cluster.world, cluster.ranks_per_node):.2f}x the mean pairs "
              f"({workload.placement} placement, {workload.redundant} replica slots a rank)")
    print(f"sequential (nccl, none, r=1): {1e3 * sequential.seconds:.3f} ms forward+backward")
    print(f"{'algorithm':<10}{'codec':<8}{'r':>3}{'fwd+bwd ms':>12}{'speedup':>9}"
          f"{'overlap eff.':>14}")
    for p in ranked[:args.top]:
        print(f"{p.algorithm:<10}{p.codec:<8}{p.degree:>3}{1e3 * p.seconds:>12.3f}"
              f"{sequential.seconds / p.seconds:>8.2f}x{p.forward.overlap_efficiency:>14.3f}")
    best = ranked[0]
    runs = {f"sequential: {1e3 * sequential.seconds:.2f} ms": sequential.forward.events
            + sequential.backward.events,
            f"best: {best.algorithm}, {best.codec}, r={best.degree}: {1e3 * best.seconds:.2f} ms":
            best.forward.events + best.backward.events}
    if args.trace:
        save_chrome_trace(runs, args.trace)
    if args.gantt:
        save_gantt(runs, args.gantt, "simulated forward + backward")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cluster": cluster.to_json(), "workload": vars(workload),
                       "predictions": [{"algorithm": p.algorithm, "codec": p.codec,
                                        "degree": p.degree, "seconds": p.seconds,
                                        "overlap_efficiency": p.forward.overlap_efficiency}
                                       for p in ranked]}, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="schedmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    _simulate_parser(sub)
    _train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _command(args, argv)
    except (ConfigError, RegistryError) as exc:  # a bad flag or file: say so, no traceback
        parser.exit(2, f"schedmoe {args.command}: error: {exc}\n")


def _command(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.command == "simulate":
        _simulate(args)
        return 0
    if args.command == "train":
        _train(args)
        return 0

    if args.command == "bench":
        cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)
                             if f.name != "layer_options"})
        if args.local_size:
            cfg.layer_options["local_size"] = args.local_size
        if args.trace:
            cfg.layer_options["trace"] = True
        number("bench", "--timeout", args.timeout, above=0)
        number("bench", "--emulate-nodes", args.emulate_nodes, integer=True,
               high=MAX_LOCAL_RANKS)
        if args.local_size is not None:
            number("bench", "--local-size", args.local_size, integer=True, low=1)
        if args.emulate_nodes:
            cfg.validate(args.emulate_nodes * planned_world(args.ranks or 2))
            summary = _bench_emulated(args, argv if argv is not None else sys.argv[1:])
        else:
            summary = run(cfg, ranks=args.ranks, timeout=args.timeout)
        if int(os.environ.get("RANK", 0)) == 0:
            print(format_table(summary))
            if args.json:
                save_json(summary, args.json)
                print(f"saved {args.json}")
            if args.trace:
                save_trace(summary, args.trace)
                print(f"saved {args.trace}.json and {args.trace}.png")
    return 0


def _bench_emulated(args: argparse.Namespace, argv: list[str]) -> dict:
    """Re-run this bench command under torchrun on every node of an emulated cluster."""
    from .emulate import ClusterSpec, EmulatedCluster

    forwarded = _strip_options(argv, {"--emulate-nodes": 1, "--inter-node-rate": 1, "--ranks": 1,
                                      "--json": 1, "--pin-cores": 0})
    spec = ClusterSpec(nodes=args.emulate_nodes, ranks_per_node=args.ranks or 2,
                       rate=args.inter_node_rate, pin_cores=args.pin_cores)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        with EmulatedCluster(spec) as cluster:
            cluster.launch(["schedmoe.tools.cli", *forwarded, "--json", out], timeout=args.timeout)
        with open(out) as f:
            summary = json.load(f)
    summary["emulated"] = {"nodes": spec.nodes, "ranks_per_node": spec.ranks_per_node,
                           "rate": spec.rate, "pinned_cores": spec.pin_cores}
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
