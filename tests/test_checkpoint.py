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
from schedmoe.testing import run_ranks
from schedmoe.train.data import CharCorpus, shard
from schedmoe.train.model import Block, lm_loss

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
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
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


def save_and_reload(rank: int, world: int, ep_size: int, root: str) -> dict:
    """For each wrapper: 2 steps, save, the next step (reference), zero everything, load:
    the state must equal the saved one exactly, and the next step repeat the reference."""
    layout = par.init_parallel(ep_size)
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


def load_elsewhere(rank: int, world: int, ep_size: int, root: str) -> dict:
    """Each wrapper's checkpoint loaded at another EP size into a model zeroed first."""
    layout = par.init_parallel(ep_size)
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
    per_rank = run_ranks(save_and_reload, world, ep_size, str(tmp_path), timeout=400)
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
    elsewhere = run_ranks(load_elsewhere, world, other_ep, str(tmp_path), timeout=400)
    for how in WRAPPERS:
        runs = [r[how] for r in per_rank]
        saved = assemble([r["saved"] for r in runs])
        _equal(assemble([r[how]["loaded"] for r in elsewhere]), saved, f"{how} at EP {other_ep}")
        reference, resumed = runs[0]["reference"], elsewhere[0][how]["next"]
        assert abs(resumed - reference) <= 1e-6 * reference, (how, resumed, reference)
