"""Expert state keyed by identity: checkpoints under wrappers (activation checkpointing, reentrant
and not, torch.compile, both, DDP around a compiled model, FSDP2, MoE layers in a ModuleList
inside a ModuleDict), saved and loaded at the same EP size and another; corrupted checkpoints;
`expert_parameters`, `full_state_dict` and `to_hf_state_dict` through wrappers.

The reference for what a rank holds is read straight off the bare model (its named parameters
and the optimizer's per-parameter state), without schedmoe's identity map.
"""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

import schedmoe
import schedmoe.parallel as par
from schedmoe.errors import CheckpointError
from schedmoe.overlap import GradSync
from schedmoe.schedulers import AdaptiveScheduler
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.data import CharCorpus, shard
from schedmoe.tools.train.model import Block, lm_loss

from test_parallel import AUX, BATCH, LR, SEQ, build

WRAPPERS = ["plain", "ac", "ac_reentrant", "compiled", "ac_compiled", "ddp_compiled", "fsdp",
            "nested"]


class Nested(nn.Module):
    """MoE blocks in a ModuleList inside a ModuleDict, the model's own modules elsewhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({"body": nn.ModuleList([inner])})

    def forward(self, tokens):
        return self.parts["body"][0](tokens)


def wrap(how: str, model: nn.Module, layout) -> tuple[nn.Module, GradSync | None]:
    """(what the user trains and checkpoints, its GradSync if it has no DDP/FSDP wrapper)."""
    if how.startswith("ac"):
        impl = CheckpointImpl.REENTRANT if how == "ac_reentrant" else CheckpointImpl.NO_REENTRANT
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper,
                                       check_fn=lambda m: isinstance(m, Block))
    if how == "nested":
        model = Nested(model)
    if how == "fsdp":
        return par.fully_shard_moe(model, layout), None
    if how == "ddp_compiled":
        return par.data_parallel(torch.compile(model, backend="eager"), layout), None
    sync = GradSync(model, layout, chunk_bytes=1 << 16)
    if how in ("compiled", "ac_compiled"):
        model = torch.compile(model, backend="eager")
    return model, sync


def step(wrapped, sync, opt, layout, index: int) -> float:
    """One AdamW step on the global batch `index`; the global loss."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, y = (shard(t, rank, world) for t in CharCorpus().batch(index, BATCH, SEQ))
    opt.zero_grad()
    loss, ce, _ = lm_loss(wrapped, x, y, AUX)
    loss.backward()
    if sync is not None:
        sync.finish()
    par.clip_grad_norm_(wrapped, 0.5, layout)
    opt.step()
    total = ce.detach().clone()
    torch.distributed.all_reduce(total)
    return float(total) / world


def _plain(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("parts.body.0.", "")


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _first_row(t: torch.Tensor, offset: int | None) -> int | None:
    """The global row at which this rank's part of `t` starts (FSDP2 shards dim 0 in
    ceil-sized chunks over its mesh), or None for a replicated tensor."""
    if hasattr(t, "to_local") and t.dim():
        mesh = t.device_mesh
        return (offset or 0) + mesh.get_local_rank() * math.ceil(t.shape[0] / mesh.size())
    return offset if t.dim() else None


def snapshot(base: nn.Module, opt) -> dict:
    """name -> (first global row or None, this rank's tensor), for every parameter and every
    optimizer state of the bare model, read without schedmoe's identity map."""
    offsets = {id(p): m.expert_offset for m in base.modules() if isinstance(m, schedmoe.MoELayer)
               for p in m.experts.parameters()}
    out = {}
    for name, p in base.named_parameters():
        offset = offsets.get(id(p))
        out[_plain(name)] = (_first_row(p, offset), _local(p))
        for sname, value in opt.state.get(p, {}).items():
            out[f"{_plain(name)}:{sname}"] = (_first_row(value, offset), _local(value))
    return out


def zero_everything(base: nn.Module, opt) -> None:
    with torch.no_grad():
        for p in base.parameters():
            for t in [p, *opt.state.get(p, {}).values()]:
                (t.to_local() if hasattr(t, "to_local") else t).zero_()


def experts_found(wrapped, base) -> bool:
    want = {id(p) for m in base.modules() if isinstance(m, schedmoe.MoELayer)
            for p in m.experts.parameters()}
    got = schedmoe.expert_parameters(wrapped)
    return {id(p) for p in got} == want and len(got) == len(want) and \
        all(getattr(p, "expert", False) for p in got)


def save_and_reload(layout, root: str) -> dict:
    """For each wrapper: 2 steps, save, the next step (reference), zero everything, load:
    the state must equal the saved one exactly, and the next step repeat the reference."""
    out = {}
    for how in WRAPPERS:
        base = build(layout)
        wrapped, sync = wrap(how, base, layout)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        found = experts_found(wrapped, base)
        for i in range(2):
            step(wrapped, sync, opt, layout, i)
        par.save_checkpoint(f"{root}/{how}", wrapped, opt, layout, extra={"how": how})
        saved = snapshot(base, opt)
        reference = step(wrapped, sync, opt, layout, 2)
        after = snapshot(base, opt)
        zero_everything(base, opt)
        extra = par.load_checkpoint(f"{root}/{how}", wrapped, opt, layout)
        loaded = snapshot(base, opt)
        again = step(wrapped, sync, opt, layout, 2)
        out[how] = {"found": found, "extra": extra, "saved": saved, "loaded": loaded,
                    "reference": reference, "again": again, "after": after,
                    "after_again": snapshot(base, opt)}
    return out


def load_elsewhere(layout, root: str) -> dict:
    """Each wrapper's checkpoint loaded at another EP size into a model zeroed first."""
    out = {}
    for how in WRAPPERS:
        base = build(layout, seed=7)
        wrapped, sync = wrap(how, base, layout)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        step(wrapped, sync, opt, layout, 5)  # optimizer state to overwrite
        zero_everything(base, opt)
        par.load_checkpoint(f"{root}/{how}", wrapped, opt, layout)
        loaded = snapshot(base, opt)
        out[how] = {"loaded": loaded, "next": step(wrapped, sync, opt, layout, 2)}
    return out


def through_wrappers(rank: int, world: int, ep_size: int, other_ep: int, root: str) -> tuple:
    """Saved and reloaded at `ep_size`, then loaded by a model at `other_ep` (one process group
    for both, so that torch.compile warms up once)."""
    here = save_and_reload(par.init_parallel(ep_size), root)
    return here, load_elsewhere(par.init_parallel(other_ep), root)


def assemble(per_rank: list[dict]) -> dict:
    """Global tensors from the ranks' snapshots: expert rows placed at their first row."""
    out: dict = {}
    for snap in per_rank:
        for key, (first, value) in snap.items():
            if first is None:
                assert key not in out or torch.equal(out[key], value), f"{key} differs by rank"
                out[key] = value
                continue
            whole = out.setdefault(key, {})
            for i, row in enumerate(value):
                assert first + i not in whole or torch.equal(whole[first + i], row), key
                whole[first + i] = row
    return {k: torch.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
            for k, v in out.items()}


def _equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), (what, a.keys() ^ b.keys())
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("world,ep_size,other_ep", [(2, 2, 1), (4, 2, 4)])
def test_checkpoints_through_every_wrapper_at_the_same_and_another_ep_size(
        tmp_path, world, ep_size, other_ep):
    results = run_ranks(through_wrappers, world, ep_size, other_ep, str(tmp_path), timeout=400)
    per_rank, elsewhere = [r[0] for r in results], [r[1] for r in results]
    for how in WRAPPERS:
        runs = [r[how] for r in per_rank]
        assert all(r["found"] for r in runs), f"{how}: expert_parameters() misses experts"
        assert runs[0]["extra"] == {"how": how}
        saved = assemble([r["saved"] for r in runs])
        assert any(":exp_avg" in k for k in saved) and any("experts" in k for k in saved)
        for r in runs:  # every rank's own state, exactly
            assert r["loaded"].keys() == r["saved"].keys()
            for key, (first, value) in r["saved"].items():
                assert r["loaded"][key][0] == first and torch.equal(r["loaded"][key][1], value), \
                    f"{how}: {key} not restored on this rank"
        assert runs[0]["again"] == runs[0]["reference"], how
        _equal(assemble([r["after_again"] for r in runs]), assemble([r["after"] for r in runs]),
               f"{how}: the step after loading")
    for how in WRAPPERS:
        runs = [r[how] for r in per_rank]
        saved = assemble([r["saved"] for r in runs])
        _equal(assemble([r[how]["loaded"] for r in elsewhere]), saved, f"{how} at EP {other_ep}")
        reference, resumed = runs[0]["reference"], elsewhere[0][how]["next"]
        assert abs(resumed - reference) <= 1e-6 * reference, (how, resumed, reference)


# -- damaged checkpoints -----------------------------------------------------------------------

def save_one(rank: int, world: int, root: str) -> None:
    """EP 2 checkpoints of a 2-layer and a 1-layer model after one DDP step."""
    layout = par.init_parallel(2)
    for layers in (2, 1):
        model = build(layout, layers=layers)
        wrapped = par.data_parallel(model, layout)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        step(wrapped, None, opt, layout, 0)
        par.save_checkpoint(f"{root}/layers{layers}", wrapped, opt, layout, extra={"step": 1})


def _flip(file: Path, offset: int, count: int = 16) -> None:
    data = bytearray(file.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    file.write_bytes(bytes(data))


def damage(root: Path) -> dict[str, str]:
    """Copies of the 2-layer checkpoint, each damaged one way; what each error must name."""
    good = root / "layers2"
    files = par.read_manifest(good)["files"]
    expert_item = next((name, item) for name, record in files.items() if name.startswith("__1_")
                       for item in record["items"] if "experts.w1_EMH" in item[0])
    shard = expert_item[0]
    expect = {}

    def copy(kind: str) -> Path:
        shutil.copytree(good, root / kind)
        return root / kind

    what, offset, length, _ = expert_item[1]
    _flip(copy("flipped") / shard, offset + length // 2)
    expect["flipped"] = f"{what} in {root / 'flipped' / shard}"
    cut = copy("truncated") / shard
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    expect["truncated"] = "truncated"
    (copy("deleted") / shard).unlink()
    expect["deleted"] = "missing"
    meta = copy("metadata") / ".metadata"
    _flip(meta, meta.stat().st_size // 2)
    expect["metadata"] = "metadata in"
    manifest = copy("manifest") / par.checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 7'))
    expect["manifest"] = "damaged"
    (copy("unfinished") / par.checkpoint.MANIFEST).unlink()
    expect["unfinished"] = "not a complete checkpoint"
    return expect


def load_damaged(rank: int, world: int, root: str, kinds: list[str]) -> dict:
    """Each damaged copy loaded into a fresh model: the error, and whether anything changed;
    then a read failure inside DCP on one rank, and checkpoints of another model."""
    layout = par.init_parallel(2)
    model = build(layout, seed=3)
    wrapped = par.data_parallel(model, layout)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    step(wrapped, None, opt, layout, 0)
    before = snapshot(model, opt)
    out = {}

    def attempt(name: str, path: str, target=wrapped, optimizer=opt, **options) -> None:
        try:
            par.load_checkpoint(path, target, optimizer, layout, **options)
            out[name] = "loaded"
        except CheckpointError as exc:
            out[name] = str(exc)

    for kind in kinds:
        attempt(kind, f"{root}/{kind}")
    from torch.distributed.checkpoint import FileSystemReader
    read_data = FileSystemReader.read_data

    def failing(self, plan, planner):
        if rank == 1:
            raise OSError("injected read failure")
        return read_data(self, plan, planner)

    FileSystemReader.read_data = failing
    attempt("dcp", f"{root}/layers2")
    FileSystemReader.read_data = read_data
    after = snapshot(model, opt)
    out["unchanged"] = all(torch.equal(after[k][1], v) for k, (_, v) in before.items())
    one = build(layout, layers=1, seed=3)
    attempt("into fewer layers", f"{root}/layers2", one, None)
    attempt("into more layers", f"{root}/layers1", model, None)
    attempt("fewer layers, not strict", f"{root}/layers2", one, None, strict=False)
    return out


def test_damaged_checkpoints_raise_checkpoint_error_on_every_rank_and_load_nothing(tmp_path):
    run_ranks(save_one, 2, str(tmp_path), timeout=120)
    expect = damage(tmp_path)
    per_rank = run_ranks(load_damaged, 2, str(tmp_path), list(expect), timeout=180)
    for out in per_rank:
        for kind, words in expect.items():
            assert words in out[kind] and out[kind] == per_rank[0][kind], (kind, out[kind])
        assert "injected read failure" in out["dcp"], out["dcp"]
        assert out["unchanged"], "a failed load changed the model or the optimizer"
        assert "this model lacks (first: model.blocks.1." in out["into fewer layers"], out
        assert "blocks.1" in out["into more layers"] and "not in the checkpoint" in \
            out["into more layers"], out
        assert out["fewer layers, not strict"] == "loaded"


# -- canonical names, in one process ------------------------------------------------------------

def _inner_wrappers(how: str) -> nn.Module:
    """A single-process MoE LM with wrappers inside it (and around it)."""
    from schedmoe.tools.train.model import MoELM
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import offload_wrapper

    torch.manual_seed(0)
    model = MoELM(20, dim=16, layers=2, heads=2, seq=8, hidden_dim=32, num_experts=4)
    if how == "compiled block":
        model.blocks[1] = torch.compile(model.blocks[1], backend="eager")
    elif how == "offloaded block in compiled model":
        model.blocks[0] = offload_wrapper(model.blocks[0])
        model = torch.compile(model, backend="eager")
    elif how == "compiled checkpointed block":
        model.blocks[0] = torch.compile(checkpoint_wrapper(model.blocks[0]), backend="eager")
    elif how == "compiled DataParallel":
        model = torch.compile(nn.DataParallel(model), backend="eager")
    return model


@pytest.mark.parametrize("how", ["compiled block", "offloaded block in compiled model",
                                 "compiled checkpointed block", "compiled DataParallel"])
def test_canonical_names_leave_out_every_wrapper_segment(how):
    bare, wrapped = _inner_wrappers("bare"), _inner_wrappers(how)
    want = [k for k in bare.state_dict() if not k.endswith("expert_range")]
    experts = par.ExpertMap(wrapped)
    entries = par.checkpoint.model_entries(wrapped, experts)
    assert [fqn for fqn, _, _ in entries] == want
    assert sorted(experts.by_fqn) == sorted(k for k in want if ".experts." in k)
    assert sorted(experts.layers) == ["blocks.0.moe", "blocks.1.moe"]
    full = par.full_state_dict(wrapped)
    assert full.keys() == par.full_state_dict(bare).keys()
    assert all(torch.equal(full[k], v) for k, v in par.full_state_dict(bare).items())
    assert [p.shape for p in schedmoe.expert_parameters(wrapped)] == \
        [p.shape for p in schedmoe.expert_parameters(bare)] and len(experts.parameters()) == 8



# -- runtime state: tuning, error feedback ------------------------------------------------------

class QuickAdaptive(AdaptiveScheduler):
    """Tuned within 7 calls: profiles r = 1, 2 of the flat A2A, then two trials of 2 steps."""

    def __init__(self) -> None:
        super().__init__(degrees=(1, 2), algorithms=("nccl",), trial_steps=2)


def runtime_resume(rank: int, world: int, root: str) -> dict:
    """The adaptive scheduler through a checkpoint at the same layout: the tuning is not
    started again, and the losses continue exactly."""
    layout = par.init_parallel(2)
    model = build(layout, scheduler=QuickAdaptive)
    wrapped = par.data_parallel(model, layout)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    for i in range(9):
        step(wrapped, None, opt, layout, i)
    par.save_checkpoint(f"{root}/adaptive", wrapped, opt, layout)
    reference = [step(wrapped, None, opt, layout, 9 + i) for i in range(2)]
    fresh = build(layout, seed=9, scheduler=QuickAdaptive)
    wrapped = par.data_parallel(fresh, layout)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    par.load_checkpoint(f"{root}/adaptive", wrapped, opt, layout)
    tuning = [layer.scheduler.tuning for layer in par.moe_layers(fresh)]
    return {"reference": reference, "tuning": tuning,
            "resumed": [step(wrapped, None, opt, layout, 9 + i) for i in range(2)]}


def test_the_adaptive_schedulers_tuning_survives_a_checkpoint(tmp_path):
    for out in run_ranks(runtime_resume, 2, str(tmp_path), timeout=240):
        assert out["tuning"] == [False, False], "the tuning started again"
        assert out["resumed"] == out["reference"]


def test_runtime_state_carries_error_feedback_and_balancing_counts():
    """What a checkpoint keeps per rank (`runtime_state`, through torch.save as it stores it):
    error-feedback residuals and aux-free balancing counts make the next call equal."""
    import io

    options = dict(capacity_factor=1.25, compressor="int8+ef", ragged=False,
                   gate="sigmoid_grouped", gate_options={"num_groups": 2, "topk_groups": 1,
                                                         "bias_update_rate": 1e-3})
    torch.manual_seed(0)
    first = schedmoe.MoELayer(16, 4, 32, **options)
    x = torch.randn(32, 16)
    with torch.no_grad():
        first(x)
        buffer = io.BytesIO()
        torch.save(first.runtime_state(), buffer)
        resumed, restarted = (schedmoe.MoELayer(16, 4, 32, **options) for _ in range(2))
        for layer in (resumed, restarted):
            layer.load_state_dict(first.state_dict())
        resumed.load_runtime_state(torch.load(io.BytesIO(buffer.getvalue()),
                                              weights_only=False))
        assert torch.equal(resumed.gate.load_E, first.gate.load_E) and first.gate.load_E.sum()
        want = first(x)
        assert torch.equal(resumed(x), want)
        assert not torch.equal(restarted(x), want)  # without it the residuals are lost


def test_to_hf_state_dict_is_the_same_through_wrappers():
    """A converted transformers model with its decoder layers activation-checkpoint wrapped and
    the whole compiled gives the state dict of the bare converted model, which is the original's."""
    pytest.importorskip("transformers")
    import schedmoe.hf as hf
    from hf_models import tiny_model

    original = tiny_model("qwen2_moe")
    bare = hf.convert(tiny_model("qwen2_moe"))
    wrapped = hf.convert(tiny_model("qwen2_moe"))
    apply_activation_checkpointing(wrapped, check_fn=lambda m: type(m).__name__.endswith(
        "DecoderLayer"))
    wrapped = torch.compile(wrapped, backend="eager")
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    want = hf.to_hf_state_dict(bare)
    got = hf.to_hf_state_dict(wrapped)
    assert got.keys() == want.keys() == original.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert len(schedmoe.expert_parameters(wrapped)) == len(schedmoe.expert_parameters(bare)) > 0
