"""Expert-parallel inference of a tiny model of each family (issue 28): prefill and decode
tokens/s, EP 1, 2 and 4 gloo ranks against the unconverted model in one process, per-rank
memory, and what each part of a decode step costs.

    python3 experiments/inference_bench.py            # ~2 minutes on 2 cores

Each family's tiny model (tests/hf_models.py: M 16, 8 experts, fp32) is saved once with
`save_pretrained` (several files) and loaded by every rank with `schedmoe.hf.from_pretrained`.
On each EP size W, every rank runs, `reps` rounds, interleaved: the unconverted model (loaded
with transformers, one process's work, every rank alike) and the converted one, each a prefill
of B x 16 tokens and 16 greedy decode steps with the KV cache (B = 1, 8), all ranks in step.
Times are the slowest rank's; tokens/s count every rank's tokens (W B per decode step) for the
converted model and one process's (B) for the unconverted one; medians over the rounds.

Memory: VmHWM growth while loading (after a tiny load paid the imports), and the peak after
decoding; and, in fresh processes on 1, 2 and 4 ranks, a Mixtral whose experts are 98% of its
parameters (M 256, I 2048, 4 layers x 8 experts, 8 MB files): the first (tiny) load's growth
and the large load's growth against the rank's share, dense + experts / W.

Per-part costs: one decode step at B = 1 with every layer tracing (the ops timed by the layer's
recorder, summed over layers), and the whole step on the inference path against the full
training path (no_grad in training mode: aux losses, timing, tuning).

Writes experiments/results/inference_bench.json and .png; the table is in docs/inference.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import FAMILIES, VOCAB, tiny_model  # noqa: E402

from schedmoe import hf  # noqa: E402
from schedmoe.hf.generate import moe_layers_in_order  # noqa: E402
from schedmoe.tools.testing import run_ranks  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
PROMPT, STEPS, BATCHES = 16, 16, (1, 8)


def _status(field: str) -> float:
    """A field of /proc/self/status in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(model, batch: int, seed: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt batch and STEPS greedy steps, every
    rank in step (the slowest rank's times)."""
    ids = torch.randint(1, VOCAB - 1, (batch, PROMPT),
                        generator=torch.Generator().manual_seed(seed))
    times = []
    with torch.no_grad():
        dist.barrier()
        began = time.perf_counter()
        out = model(ids, use_cache=True)
        times.append(time.perf_counter() - began)
        began = time.perf_counter()
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(STEPS):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - began)
    slowest = torch.tensor(times)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest[0]), float(slowest[1])


def _decode_parts(model) -> dict:
    """One decode step at B = 1 with every layer tracing: ms per op summed over the layers;
    and a whole step on the inference path against the full path (training mode)."""
    layers = moe_layers_in_order(model)
    ids = torch.randint(1, VOCAB - 1, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    out = {}
    with torch.no_grad():
        first = model(ids, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        for layer in layers:
            layer.config.trace = True
        parts: dict[str, list[float]] = {}
        for _ in range(9):
            model(token, past_key_values=copy.deepcopy(first.past_key_values), use_cache=True)
            step: dict[str, float] = {}
            for layer in layers:
                for op, ms in layer.last_stats.op_ms.items():
                    step[op] = step.get(op, 0.0) + ms
            for op, ms in step.items():
                parts.setdefault(op, []).append(ms)
        for layer in layers:
            layer.config.trace = False
        out["op_ms"] = {op: statistics.median(v) for op, v in parts.items()}
        for mode in ("inference", "full"):
            model.train(mode == "full")
            steps = []
            for _ in range(9):
                past = copy.deepcopy(first.past_key_values)  # the same step each time
                dist.barrier()
                began = time.perf_counter()
                model(token, past_key_values=past, use_cache=True)
                steps.append(time.perf_counter() - began)
            out[f"{mode}_step_ms"] = 1e3 * statistics.median(steps)
        model.eval()
    return out


def bench_rank(rank: int, world: int, roots: dict[str, str], tiny: str, reps: int) -> dict:
    import transformers
    torch.set_num_threads(1)
    hf.from_pretrained(tiny)  # imports and process groups, paid once before measuring
    found = {}
    for family, root in roots.items():
        before = _status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        model = hf.from_pretrained(root)
        load_mb = _status("VmHWM") - before
        reference = transformers.AutoModelForCausalLM.from_pretrained(root).eval()
        runs: dict[str, dict[int, list]] = {"unconverted": {}, "schedmoe": {}}
        for rep in range(reps):
            for batch in BATCHES:
                for name, m in (("unconverted", reference), ("schedmoe", model)):
                    runs[name].setdefault(batch, []).append(_run(m, batch, 100 * rep + rank))
        result = {"load_growth_mb": load_mb}
        for name, by_batch in runs.items():
            tokens = world if name == "schedmoe" else 1  # every rank's batch, or one process's
            result[name] = {str(b): {
                "prefill_tok_s": tokens * b * PROMPT / statistics.median(t[0] for t in v),
                "decode_tok_s": tokens * b * STEPS / statistics.median(t[1] for t in v)}
                for b, v in by_batch.items()}
        result.update(_decode_parts(model))
        result["peak_rss_mb"] = _status("VmHWM")
        found[family] = result
        del model, reference
    return found


LARGE = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
             num_local_experts=8, num_experts_per_tok=2)  # experts: 98% of the parameters


def _grow(load) -> float:
    """MB the peak RSS (VmHWM) grows by while `load()` runs."""
    before = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from now
    load()
    return _status("VmHWM") - before


def memory_rank(rank: int, world: int, large: str, tiny: str) -> dict:
    """In a fresh process: what the first (tiny) load costs (imports, process groups), then
    the large model's load growth against the rank's share, dense + experts / W."""
    first = _grow(lambda: hf.from_pretrained(tiny))
    kept = []
    large_mb = _grow(lambda: kept.append(hf.from_pretrained(large)))
    experts = {id(p) for layer in moe_layers_in_order(kept[0]) for p in layer.experts.parameters()}
    dense = sum(p.numel() * p.element_size() for p in kept[0].parameters()
                if id(p) not in experts) / 2 ** 20
    total = LARGE["num_hidden_layers"] * LARGE["num_local_experts"] * 3 * \
        LARGE["hidden_size"] * LARGE["intermediate_size"] * 4 / 2 ** 20
    share = dense + total / world
    return {"first_load_growth_mb": first, "load_growth_mb": large_mb, "share_mb": share,
            "ratio": large_mb / share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for family in FAMILIES:
            roots[family] = f"{tmp}/{family}"
            tiny_model(family).save_pretrained(roots[family], max_shard_size="20KB")
        tiny_model("mixtral").save_pretrained(f"{tmp}/tiny")
        results = {}
        for world in (1, 2, 4):
            per_rank = run_ranks(bench_rank, world, roots, f"{tmp}/tiny", args.reps,
                                 timeout=1800, collective_timeout=300)
            results[str(world)] = {
                family: {**per_rank[0][family],
                         "load_growth_mb_per_rank": [r[family]["load_growth_mb"]
                                                     for r in per_rank],
                         "peak_rss_mb_per_rank": [r[family]["peak_rss_mb"] for r in per_rank]}
                for family in FAMILIES}
            print(world, {f: round(v["schedmoe"]["1"]["decode_tok_s"])
                          for f, v in results[str(world)].items()})
        tiny_model("mixtral", **LARGE).save_pretrained(f"{tmp}/large", max_shard_size="8MB")
        memory = {str(world): run_ranks(memory_rank, world, f"{tmp}/large", f"{tmp}/tiny",
                                        timeout=600)
                  for world in (1, 2, 4)}
        print("load memory", {w: [round(r["ratio"], 3) for r in v] for w, v in memory.items()})
    record = {"command": "python3 experiments/inference_bench.py", "prompt": PROMPT,
              "decode_steps": STEPS, "reps": args.reps, "results": results,
              "load_memory": {"model": {"family": "mixtral", **LARGE}, "per_rank": memory}}
    OUT.mkdir(exist_ok=True)
    (OUT / "inference_bench.json").write_text(json.dumps(record, indent=1))
    plot(results, OUT / "inference_bench.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = list(FAMILIES)
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(7 * len(BATCHES), 4))
    for ax, batch in zip(np.atleast_1d(axes), BATCHES):
        x = np.arange(len(families))
        ax.bar(x - 0.3, [results["1"][f]["unconverted"][str(batch)]["decode_tok_s"]
                         for f in families], 0.2, label="unconverted, 1 process")
        for i, world in enumerate(results):
            ax.bar(x - 0.1 + 0.2 * i, [results[world][f]["schedmoe"][str(batch)]["decode_tok_s"]
                                       for f in families], 0.2, label=f"schedmoe EP {world}")
        ax.set_xticks(x, families, rotation=20)
        ax.set_ylabel("decode tokens/s (all ranks)")
        ax.set_title(f"batch {batch} a rank")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
