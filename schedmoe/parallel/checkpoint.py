"""Checkpoints with global expert identity, through torch.distributed.checkpoint (DCP), safe to
resume from.

Legend: E experts (global), E/EP per rank, W ranks.

What is stored. Every expert tensor (found by identity, `identity.ExpertMap`: a parameter or
buffer of a layer's experts, and each optimizer state of its rows) as a DTensor of its global
shape [E, ...] split by EP rank: `(Shard(0), Replicate())` on the layout's ("ep", "edp") mesh
under the DDP recipe, `(Shard(0), Shard(0))` under FSDP2's (whose shards are already split over
EDP). DCP stores each expert once, at its global index, and a load at another EP size or world
size reads each rank's new rows: it reshards. A placed layer (replica slots, a planned
placement) is stored in the same logical form: its slots are gathered back into expert order
on save and each rank's slots filled from the logical rows on load (`ExpertTensor.logical`,
`physical`), so a checkpoint loads under any placement, EP size or number of replica slots;
the loading model keeps its own placement. Dense tensors as they are (replicated ones written
once; FSDP2's shards are DTensors already). Keys are canonical FQNs, so a model saved under
wrappers (activation checkpointing, torch.compile, DDP, FSDP2) loads into the bare model and
back. Each rank's RNG states are stored too (`rng.<rank>`), for exact resumes.

How it is kept safe:
- Atomic: DCP writes into `<path>.partial`; each rank hashes the stored bytes of the items in
  its share of the files; rank 0 writes the manifest (`schedmoe.json`: `extra`, the world size,
  each file's size and each stored item's SHA-256, itself checksummed) and renames the
  directory to `<path>` once every rank has finished. A crash before that leaves `<path>` as
  it was (no checkpoint, or the previous complete one).
- Verified: a load first checks the manifest, then each rank re-hashes its share of the files;
  a missing, truncated or altered file (data, metadata or manifest) becomes the same
  CheckpointError on every rank, naming the tensor and file, before anything is read.
- Accounted: every tensor of the model (and optimizer) must be in the checkpoint with its
  global shape, and every tensor of the checkpoint must be the model's, unless `strict=False`.
- Nothing half-loaded: DCP reads into fresh tensors; the model and optimizer are written only
  after it succeeded. Any DCP failure (its `CheckpointException` is a BaseException) becomes a
  CheckpointError on every rank.

`full_state_dict` is the other way out: every expert gathered into one plain state dict (for
`torch.save` on rank 0, or transformers), which `load_state_dict` slices on each rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..comm.groups import EPGroup
from ..errors import CheckpointError
from ..ops.experts.ranges import KEY, KEYS
from .identity import ExpertMap, ExpertTensor, canonical_name
from .mesh import ParallelLayout, check_layers, local_part

MANIFEST = "schedmoe.json"
FORMAT = 1
_BLOCK = 1 << 24  # bytes read at a time when hashing


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, layout: ParallelLayout,
                    extra: dict | None = None) -> None:
    """Save the model, the optimizer, every rank's RNG states and `extra` (JSON-serialisable
    training state: step, ...) into the directory `path`, atomically (a collective: every rank
    calls it). An existing checkpoint at `path` is replaced once the new one is complete."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    experts = ExpertMap(model)
    state, _, _ = _state(model, optimizer, layout, experts)
    state.update(_rank_state(experts))
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save_checkpoint's extra must be JSON-serialisable: {exc}") from exc
    first = dist.get_rank() == 0
    _agree(_attempt(lambda: _fresh_dir(partial)) if first else None)
    _run_dcp(dcp.save, state, partial, "write")
    try:
        items = _hash_share(partial, _stored_items(partial))
    except OSError as exc:
        items = {"problem": f"could not read back {partial}: {exc}"}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    problems = [g["problem"] for g in gathered if "problem" in g]  # the same on every rank
    if problems:
        raise CheckpointError(problems[0])
    problem = None
    if first:
        body = {"format": FORMAT, "world_size": dist.get_world_size(),
                "ep_size": layout.ep_size, "extra": extra_json,
                "files": {k: v for g in gathered for k, v in g.items()}}
        problem = _attempt(lambda: (_write_manifest(partial, body), _publish(partial, path)))
    _agree(problem)


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, layout: ParallelLayout, *,
                    strict: bool = True) -> dict:
    """Load what `save_checkpoint` saved, at this model's (possibly different) EP size and
    world size; returns `extra`. A collective: every rank calls it. The checkpoint is verified
    first; `strict=False` skips tensors that only one side has. At the layout saved (world and
    EP size) each rank's RNG states and its layers' runtime state are restored too."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    experts = ExpertMap(model)
    state, targets, owners = _state(model, optimizer, layout, experts)
    saved = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    if optimizer is not None and not strict and not any(k.startswith("optim.") for k in saved):
        optimizer = None  # saved without one: load the model only
        state = {k: v for k, v in state.items() if not k.startswith("optim.")}
    _agree(_account(path, state, set(owners), saved, strict))
    state = {k: v for k, v in state.items() if k in saved or not isinstance(v, torch.Tensor)}
    same_layout = (manifest["world_size"], manifest["ep_size"]) == (dist.get_world_size(),
                                                                    layout.ep_size)
    mine = {k: torch.empty(saved[k].size, dtype=torch.uint8) for k in _rank_keys()
            if same_layout and k in saved}
    state.update(mine)
    fresh = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v
             for k, v in state.items()}
    _run_dcp(dcp.load, fresh, path, "read")
    with torch.no_grad():
        for key, target in targets.items():
            if key in fresh:
                value = local_part(fresh[key])
                if key in owners:  # logical rows -> this rank's slots (a collective)
                    value = owners[key].physical(value)
                local_part(target).copy_(value)
    if optimizer is not None:
        optim_state = {"state": {}, "param_groups": fresh["optim.param_groups"]}
        for key, value in fresh.items():
            if key.startswith("optim.state."):
                fqn, name = key[len("optim.state."):].rsplit(".", 1)
                optim_state["state"].setdefault(fqn, {})[name] = targets.get(key, value)
        set_optimizer_state_dict(model, optimizer, optim_state)
    _restore_rank_state(experts, {k.rsplit(".", 1)[0]: fresh[k] for k in mine})
    return manifest["extra"]


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the complete checkpoint at `path` (no collective, no tensor read):
    `extra`, `world_size`, the stored files. Raises CheckpointError if there is none or it is
    damaged."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"there is no checkpoint at {path}")
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {MANIFEST} (its "
                              "save did not finish, or it was not written by schedmoe)")
    try:
        record = json.loads(file.read_text())
        body, digest = record["body"], record["sha256"]
        if _digest(body) != digest or body["format"] != FORMAT:
            raise ValueError("its checksum does not match its contents")
        if {"world_size", "ep_size", "extra", "files"} - body.keys():
            raise ValueError("entries are missing")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} is damaged ({exc}); the checkpoint cannot be "
                              "trusted") from exc
    return body


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every stored file against the manifest, each rank a share of them (a collective);
    returns the manifest, or raises the same CheckpointError on every rank, naming the first
    problem found (tensor and file)."""
    path = Path(path)
    problem, manifest = None, None
    try:
        manifest = read_manifest(path)
        problem = _check_share(path, manifest["files"])
    except CheckpointError as exc:
        problem = str(exc)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, or a bad record
        problem = f"{path} could not be checked: {type(exc).__name__}: {exc}"
    _agree(problem)
    return manifest


# -- the state: one flat dict, expert tensors as global DTensors ------------------------------

def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: ParallelLayout,
           experts: ExpertMap) -> tuple[dict, dict, dict[str, ExpertTensor]]:
    """One flat dict: "model.<fqn>", "optim.state.<fqn>.<name>", "optim.param_groups" (canonical
    FQNs); every expert tensor as a DTensor of its global shape. And the tensors of the model
    and optimizer that each tensor entry stands for (where a load writes), by key; and the
    expert behind each key of an expert tensor or its optimizer state (whose rows a load maps
    back from logical form), in the same order on every rank."""
    check_layers(model, layout)
    state, targets, owners = {}, {}, {}
    for fqn, value, expert in model_entries(model, experts):
        key = f"model.{fqn}"
        if isinstance(value, torch.Tensor):
            targets[key] = value
            value = value.detach()
            if expert is not None:
                value = _global(expert.logical(value), expert, layout, key)
                owners[key] = expert
        state[key] = value
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer)
        for fqn, named in optim["state"].items():
            expert = experts.by_fqn.get(fqn)
            for name, value in named.items():
                key = f"optim.state.{fqn}.{name}"
                if isinstance(value, torch.Tensor):
                    targets[key] = value
                    if expert is not None and value.dim():
                        value = _global(expert.logical(value), expert, layout, key)
                        owners[key] = expert
                state[key] = value
        state["optim.param_groups"] = optim["param_groups"]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]
                if optimizer.state.get(p)}
        lost = [e.fqn for e in experts.by_id.values()
                if id(e.tensor) in held and e.fqn not in optim["state"]]
        if lost:
            raise CheckpointError(f"the optimizer state of expert parameter(s) {lost} is not "
                                  "under their names; pass the model the optimizer was built on")
    return state, targets, owners


def model_entries(model: nn.Module, experts: ExpertMap
                  ) -> list[tuple[str, object, ExpertTensor | None]]:
    """(canonical FQN, value, expert or None) of every entry of the model's state dict, its
    tensors the model's own objects; the plain state dict's `expert_range` records left out.
    Raises CheckpointError for an expert tensor it cannot account for."""
    entries, seen, names = [], set(), set()
    ranges = {f"{name}.{key}" if name else key for name in experts.layers for key in KEYS}
    for key, value in model.state_dict(keep_vars=True).items():
        fqn = canonical_name(model, key)
        if fqn in ranges:
            continue
        if fqn in names:
            raise CheckpointError(f"two state-dict entries of the model are both named {fqn} "
                                  "once wrapper prefixes are left out")
        names.add(fqn)
        expert = experts.get(value)
        if expert is not None:
            seen.add(id(value))
        entries.append((fqn, value, expert))
    lost = [e.fqn for e in experts.by_id.values() if id(e.tensor) not in seen]
    if lost:
        raise CheckpointError(f"expert tensor(s) {lost} are not in the model's state dict as "
                              "themselves (a wrapper copies or renames them); they cannot be "
                              "saved or loaded with their expert identity")
    return entries


def _global(value: torch.Tensor, expert: ExpertTensor, layout: ParallelLayout,
            key: str) -> DTensor:
    """This rank's expert rows as the global [E, ...] DTensor on the layout's mesh."""
    if isinstance(value, DTensor):  # FSDP2: [E/EP, ...] sharded over EDP already
        local, second = value.to_local(), Shard(0)
    else:
        local, second = value, Replicate()
    if value.shape[0] != expert.local_experts:
        raise CheckpointError(f"{key}: an expert tensor of shape {tuple(value.shape)} does not "
                              f"start with the {expert.local_experts} local experts")
    shape = torch.Size((expert.num_experts, *value.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, layout.mesh, (Shard(0), second), run_check=False,
                              shape=shape, stride=stride)


def _account(path: Path, state: dict, experts: set[str], saved: dict,
             strict: bool) -> str | None:
    """What does not fit between the model's tensors and the checkpoint's, or None: a tensor
    missing on either side (unless not strict), another global shape (expert tensors first:
    their first dim is num_experts)."""
    ours = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for key in sorted(ours, key=lambda k: k not in experts):
        if key not in saved:
            if strict:
                return (f"{key} is not in the checkpoint at {path}: it was saved from another "
                        "model (load_checkpoint(..., strict=False) keeps this tensor as it is)")
            continue
        size = getattr(saved[key], "size", None)
        if size is not None and tuple(size) != tuple(ours[key].shape):
            kind = "expert tensor [num_experts, ...]" if key in experts else "tensor"
            return (f"{key}: the checkpoint's {kind} has global shape {tuple(size)}, this "
                    f"model's is {tuple(ours[key].shape)}; num_experts and the expert and model "
                    "sizes must match the checkpoint (the EP size and world size may differ)")
    wanted = ("model.", "optim.") if any(k.startswith("optim.") for k in state) else ("model.",)
    unknown = sorted(k for k, m in saved.items() if isinstance(m, TensorStorageMetadata)
                     and k.startswith(wanted) and k not in ours)
    if unknown and strict:
        return (f"the checkpoint at {path} holds {len(unknown)} tensor(s) this model lacks "
                f"(first: {', '.join(unknown[:3])}): it was saved from another model "
                "(load_checkpoint(..., strict=False) ignores them)")
    return None


# -- integrity: stored items hashed on save, checked on load ----------------------------------

def _stored_items(path: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Every stored file of the DCP checkpoint at `path` with its items: (what, offset,
    length); `.metadata` as one item of its whole size."""
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
    files: dict[str, list[tuple[str, int, int]]] = {}
    for index, info in metadata.storage_data.items():
        what = index.fqn + (f" (chunk at {list(index.offset)})"
                            if index.offset is not None and any(index.offset) else "")
        files.setdefault(info.relative_path, []).append((what, info.offset, info.length))
    files[".metadata"] = [("the checkpoint's metadata", 0, (path / ".metadata").stat().st_size)]
    return files


def _my_share(names) -> list[str]:
    """This rank's files of a sorted list: file i goes to rank i % W."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return [n for i, n in enumerate(sorted(names)) if i % world == rank]


def _hash_share(path: Path, files: dict[str, list[tuple[str, int, int]]]) -> dict:
    """This rank's share of `files` with their sizes and each item's SHA-256."""
    out = {}
    for name in _my_share(files):
        with open(path / name, "rb") as f:
            items = [[what, offset, length, _sha(f, offset, length)]
                     for what, offset, length in sorted(files[name], key=lambda i: i[1])]
        out[name] = {"size": (path / name).stat().st_size, "items": items}
    return out


def _check_share(path: Path, files: dict) -> str | None:
    """The first problem in this rank's share of the manifest's files, or None."""
    for name in _my_share(files):
        file, record = path / name, files[name]
        if not file.is_file():
            return f"{file} is missing from the checkpoint"
        if file.stat().st_size != record["size"]:
            return (f"{file} has {file.stat().st_size} bytes, {record['size']} were written: "
                    "it is truncated or was replaced")
        with open(file, "rb") as f:
            for what, offset, length, digest in record["items"]:
                if _sha(f, offset, length) != digest:
                    return (f"{what} in {file} does not match its checksum: the stored data "
                            "is corrupted")
    return None


def _sha(f, offset: int, length: int) -> str:
    f.seek(offset)
    h, left = hashlib.sha256(), length
    while left > 0:
        block = f.read(min(left, _BLOCK))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_manifest(path: Path, body: dict) -> None:
    with open(path / MANIFEST, "w") as f:
        json.dump({"body": body, "sha256": _digest(body)}, f)
        f.flush()
        os.fsync(f.fileno())


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # what a crashed save left
    path.mkdir(parents=True)


def _publish(partial: Path, path: Path) -> None:
    """Rename the finished `partial` to `path`, replacing what was there."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- every rank alike ---------------------------------------------------------------------------

def _attempt(fn) -> str | None:
    """Run `fn`; its failure as a message (for `_agree`), or None."""
    try:
        fn()
    except (OSError, CheckpointError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _agree(problem: str | None) -> None:
    """Raise CheckpointError on every rank if any rank has a problem (the lowest rank's)."""
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for rank, found in enumerate(problems):
        if found is not None:
            raise CheckpointError(found if dist.get_world_size() == 1 else
                                  f"{found} (found by rank {rank})")


def _run_dcp(fn, state: dict, path: Path, what: str) -> None:
    """`dcp.save` / `dcp.load`, their failures (on any rank: DCP gathers them) as
    CheckpointError."""
    try:
        fn(state, checkpoint_id=os.fspath(path))
    except CheckpointException as exc:  # a BaseException: `except Exception` misses it
        raise CheckpointError(f"DCP could not {what} the checkpoint at {path}: "
                              f"{_first_failure(exc)}") from exc
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"DCP could not {what} the checkpoint at {path}: "
                              f"{type(exc).__name__}: {exc}") from exc


def _first_failure(exc: CheckpointException) -> str:
    """The first failing rank's error, from what DCP gathered: {rank: (exception, stack)}."""
    for rank, failure in sorted((getattr(exc, "failures", None) or {}).items()):
        if isinstance(failure, tuple):
            failure = failure[0]
        return f"rank {rank}: {type(failure).__name__}: {failure}"
    return str(exc) or type(exc).__name__


# -- what belongs to one rank: RNG states, the layers' runtime state -------------------------

def _rank_keys() -> list[str]:
    rank = dist.get_rank()
    return [f"rng.{rank}", f"rng_cuda.{rank}", f"runtime.{rank}"]


def _rank_state(experts: ExpertMap) -> dict[str, torch.Tensor]:
    """This rank's RNG states (CPU, and the current CUDA device's if in use) and its layers'
    `runtime_state()` by canonical name (pickled into bytes: DCP keeps per-rank keys apart)."""
    rng, rng_cuda, runtime = _rank_keys()
    out = {rng: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[rng_cuda] = torch.cuda.get_rng_state()
    buffer = io.BytesIO()
    torch.save({name: layer.runtime_state() for name, layer in experts.layers.items()}, buffer)
    out[runtime] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    return out


def _restore_rank_state(experts: ExpertMap, saved: dict[str, torch.Tensor]) -> None:
    if "rng" in saved:
        torch.set_rng_state(saved["rng"])
    if "rng_cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng_cuda"])
    layers = experts.layers
    if "runtime" in saved and layers:
        device = next(next(iter(layers.values())).parameters()).device
        # weights_only=False: the scheduler's decisions are dataclasses; the bytes were
        # verified against the manifest's checksum before this
        runtime = torch.load(io.BytesIO(saved["runtime"].numpy().tobytes()),
                             map_location=device, weights_only=False)
        for name, state in runtime.items():
            if name in layers:
                layers[name].load_runtime_state(state)


# -- plain state dicts ------------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict under canonical names with every expert gathered over its EP
    group (and FSDP2's shards gathered): a collective, call it on every rank. Save it from rank
    0 with torch.save; it loads with `load_state_dict` into the model at any EP size, each rank
    taking its rows."""
    experts = ExpertMap(model)
    out = {}
    for fqn, value, expert in model_entries(model, experts):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if expert is not None:
                value = gather_experts(expert.logical(value), expert.layer.group)
            elif isinstance(value, DTensor):
                value = value.full_tensor()
        out[fqn] = value
    for name, layer in experts.layers.items():
        total = layer.config.num_experts
        out[f"{name}.{KEY}" if name else KEY] = torch.tensor([0, total, total])
    return out


def gather_experts(local: torch.Tensor, group: EPGroup) -> torch.Tensor:
    """Every EP rank's rows of an expert tensor, in rank order: the global [E, ...] tensor
    (FSDP2's shard of this rank's rows is gathered over its mesh first)."""
    if isinstance(local, DTensor):
        local = local.full_tensor()
    if not group.distributed:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(parts, local.contiguous(), group=group.pg)
    return torch.cat(parts)
