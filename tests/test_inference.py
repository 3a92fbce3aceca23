"""Inference with expert parallelism (issue 28): the no-grad path's collectives, and generation
in which every rank has its own prompts (hf.generate), against the unconverted model.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import schedmoe
from schedmoe import hf
from schedmoe.tools.testing import run_ranks

pytest.importorskip("transformers")

from hf_models import FAMILIES, tiny_model, token_ids  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "reduce_scatter_tensor", "all_gather_object",
               "barrier")


class Count:
    """Counts the calls of torch.distributed's collectives while active."""

    def __enter__(self) -> Counter:
        self.seen, self.saved = Counter(), {}
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self.saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.seen[_name] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self.seen

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


def _collectives(rank: int, world: int) -> dict:
    """Collectives per call of a dropless layer with the "global" balance loss, after two
    warm-up calls: in training, under no_grad in eval mode, under inference_mode, and under
    no_grad in training mode (a reentrant activation checkpoint's forward: the full path)."""
    torch.manual_seed(0)
    layer = schedmoe.MoELayer(8, 4, 16, capacity_factor=0.0, balance_loss="global",
                              balance_group=dist.group.WORLD, scheduler="adaptive")
    x = torch.randn(6 + rank, 8, generator=torch.Generator().manual_seed(rank))
    out = {}
    for mode in ("train", "no_grad eval", "inference_mode", "no_grad train"):
        layer.train(mode.endswith("train"))
        context = (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
                   if mode.startswith("no_grad") else torch.enable_grad())
        with context:
            for _ in range(2):
                layer(x)
            decisions = len(layer.scheduler.decisions)
            with Count() as seen:
                y = layer(x)
        out[mode] = {"collectives": dict(seen), "aux": float(y.l_aux),
                     "timed": bool(layer.last_stats.op_ms),
                     "tuned": len(layer.scheduler.decisions) > decisions}
    return out


def test_the_no_grad_path_makes_only_the_agreement_and_the_exchanges():
    for out in run_ranks(_collectives, 2):
        for mode in ("no_grad eval", "inference_mode"):
            quiet = out[mode]
            assert quiet["collectives"] == {"all_gather": 1, "all_to_all_single": 2}, (mode,
                                                                                       quiet)
            assert quiet["aux"] == 0.0 and not quiet["timed"], (mode, quiet)
        for mode in ("train", "no_grad train"):  # the full path: the balance loss all-reduces
            full = out[mode]
            assert full["collectives"].get("all_reduce", 0) >= 1, (mode, full)
            assert full["aux"] > 0.0 and full["timed"], (mode, full)
        assert out["train"]["tuned"] and not out["no_grad eval"]["tuned"]


def _mixed_modes(rank: int, world: int) -> str:
    """Rank 0 in eval mode, rank 1 in training mode, both under no_grad: one would make the
    global balance loss's all-reduce and the other not."""
    layer = schedmoe.MoELayer(8, 4, 16, capacity_factor=0.0, balance_loss="global",
                              balance_group=dist.group.WORLD)
    layer.train(rank == 1)
    try:
        with torch.no_grad():
            layer(torch.randn(5, 8))
    except schedmoe.errors.InputError as exc:
        return str(exc)
    return "ran"


def test_ranks_in_other_modes_get_a_typed_error_not_a_hang():
    for said in run_ranks(_mixed_modes, 2):
        assert "call kind" in said and "rank 0: inference" in said, said


def _uneven(rank: int, world: int, families: list[str]) -> dict[str, bool]:
    """Each rank generates for its own prompts: lengths and batch sizes differ by rank, rank 1
    stops 10 tokens before the others, the last rank has no prompts at all; every rank's tokens
    against the unconverted model's on the same prompts."""
    out = {}
    for family in families:
        reference = tiny_model(family)
        converted = hf.convert(copy.deepcopy(reference))
        ids = None if rank == world - 1 else token_ids(rank, batch=1 + rank % 2,
                                                       length=4 + 3 * rank)
        steps = dict(max_new_tokens=4 if rank == 1 else 14, do_sample=False)
        got = hf.generate(converted, ids, **steps)
        if ids is None:
            out[family] = got is None
        else:
            with torch.no_grad():
                want = reference.generate(ids, **steps)
            out[family] = torch.equal(got, want)
    return out


@pytest.mark.parametrize("world,families", [(2, list(FAMILIES)),
                                            (4, ["mixtral", "deepseek_v3"])])
def test_generation_with_uneven_ranks_equals_the_unconverted_model(world, families):
    for rank, out in enumerate(run_ranks(_uneven, world, families, timeout=300)):
        assert out == {family: True for family in families}, (rank, out)


# -- sharded loading ---------------------------------------------------------------------------

def _save_all(root: str) -> None:
    for family in FAMILIES:
        tiny_model(family).save_pretrained(f"{root}/{family}", max_shard_size="20KB")


def _sharded(rank: int, world: int, root: str) -> dict[str, list[str]]:
    """Each family loaded by from_pretrained: every tensor of this rank equals the converted
    full model's, and the logits the unconverted model's."""
    out = {}
    for family in FAMILIES:
        reference = tiny_model(family)
        want = hf.convert(copy.deepcopy(reference)).state_dict()
        model = hf.from_pretrained(f"{root}/{family}")
        got = model.state_dict()
        wrong = sorted(k for k in want.keys() | got.keys()
                       if k not in got or k not in want or not torch.equal(got[k], want[k]))
        ids = token_ids(rank)
        with torch.no_grad():
            if not torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5,
                                  rtol=1e-5):
                wrong.append("logits")
        out[family] = wrong
    return out


def test_sharded_loading_reads_each_ranks_experts_of_every_family(tmp_path):
    _save_all(str(tmp_path))
    assert len(list((tmp_path / "mixtral").glob("*.safetensors"))) > 2  # several files
    for out in run_ranks(_sharded, 2, str(tmp_path), timeout=300):
        assert out == {family: [] for family in FAMILIES}, out


def _without(root: str, family: str, key: str) -> str:
    """A copy of the checkpoint of `family` without the tensor `key` (index and file)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    src, dst = Path(root) / family, Path(root) / f"{family}-without"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    file = dst / index["weight_map"].pop(key)
    tensors = load_file(file)
    del tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(dst)


def _load_error(rank: int, world: int, path: str) -> str:
    try:
        hf.from_pretrained(path)
    except schedmoe.errors.CheckpointError as exc:
        return str(exc)
    return "loaded"


def test_a_missing_expert_is_the_same_error_on_every_rank(tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.6.w3.weight"  # rank 1's (experts 4-7)
    tiny_model("mixtral").save_pretrained(tmp_path / "mixtral", max_shard_size="20KB")
    path = _without(str(tmp_path), "mixtral", key)
    errors = run_ranks(_load_error, 2, path)
    assert errors[0] == errors[1], errors
    assert "model.layers.1.mlp.experts.6.w3.weight is not in the checkpoint" in errors[0]
    assert "found by rank 1" in errors[0]


LARGE = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
             num_local_experts=8, num_experts_per_tok=2)


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _peak(rank: int, world: int, path: str, tiny: str) -> tuple[int, int, int]:
    """This rank's peak memory growth while loading, its dense bytes and all expert bytes.
    What a process pays once whatever it loads (~10 MB of imported code, process groups) is
    paid before measuring, by loading a tiny checkpoint of the same family first."""
    hf.from_pretrained(tiny)
    before = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
    model = hf.from_pretrained(path)
    grew = _status("VmHWM") - before
    experts = {id(p) for b in model.modules() if isinstance(b, hf.HFMoEBlock)
               for p in b.moe.experts.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
    total_experts = 4 * 8 * 3 * 256 * 2048 * 4
    return grew, dense, total_experts


def test_sharded_loading_peaks_at_a_ranks_share(tmp_path):
    """A model whose experts are 98% of its parameters: each rank's peak memory growth while
    loading stays within 1.3x (dense + experts / W), measured in fresh processes."""
    tiny_model("mixtral", **LARGE).save_pretrained(tmp_path / "large", max_shard_size="8MB")
    tiny_model("mixtral").save_pretrained(tmp_path / "tiny")
    for world in (2, 4):
        for grew, dense, experts in run_ranks(_peak, world, str(tmp_path / "large"),
                                              str(tmp_path / "tiny")):
            assert experts >= 0.8 * (experts + dense)
            assert grew <= 1.3 * (dense + experts / world), (world, grew, dense, experts)
