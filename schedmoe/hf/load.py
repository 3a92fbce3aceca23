"""Sharded loading: a transformers MoE checkpoint straight into a converted model, each rank
reading the dense weights and only its own experts, so that a model whose experts do not fit
one process loads on W of them.

Legend: E experts, W ranks of the EP group, n = E / W, [lo, lo + n) this rank's experts.

1. The model is built from its config with every parameter on the meta device (buffers, which
   are small and some computed at construction, as they are), and converted (`convert`) on
   the meta device: nothing of the experts is allocated yet.
2. The remaining meta parameters are allocated (ties kept), and filled from the checkpoint's
   safetensors files (one or several, `model.safetensors.index.json`), reading only the
   tensors this rank needs and, of a fused expert tensor `[E, ...]`, only rows [lo, lo + n),
   with plain reads (no memory map: the process holds only what it keeps).
3. Every parameter and persistent buffer must have been read, every one of this rank's experts
   complete; any problem is the same CheckpointError on every rank (one all-gather of the
   problems, the loader's only collective besides the layers' construction).

Checkpoints are read in the hub's layout, which `save_pretrained` writes: one tensor per expert
and projection (`experts.<e>.w1/w3/w2` for Mixtral, whose blocks are `block_sparse_moe` on disk,
`experts.<e>.gate_proj/up_proj/down_proj` for the others), or fused `[E, ...]` tensors named as
the module's (GPT-OSS, or checkpoints saved fused).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, ConfigError
from .convert import HFMoEBlock, convert
from .families import expert_tensors, shared_tensors

# Per-expert tensor names on disk (gate, up, down), by family; and disk -> module renames.
_PER_EXPERT = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_PER_EXPERT = ("gate_proj", "up_proj", "down_proj")
_RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}
_FUSED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def from_pretrained(path: str | os.PathLike, group: dist.ProcessGroup | None = None,
                    dtype: torch.dtype | None = None, **layer_options) -> nn.Module:
    """The converted model of the transformers checkpoint at `path` (a directory written by
    `save_pretrained`), each EP rank of `group` holding the dense weights and its own experts
    only; in eval mode, on the CPU (move it with `.to(device)`). A collective: every rank
    calls it. `layer_options` go to every MoELayer, as in `convert`."""
    import transformers

    if layer_options.get("redundant_slots"):
        raise ConfigError("from_pretrained loads the static placement; build without "
                          "redundant_slots and place the experts after loading (layer.place)")
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(
            config, **({"dtype": dtype} if dtype is not None else {}))
        with torch.device("meta"):  # the layers' own initialisation writes nothing either
            convert(model, group, **layer_options)
    _materialize(model)
    problem = None
    try:
        _load(model, path, getattr(config, "model_type", ""))
    except Exception as exc:  # any rank's failure, raised on every rank (no rank left waiting)
        problem = str(exc) if isinstance(exc, CheckpointError) else \
            f"{type(exc).__name__}: {exc}"
    _agree(problem)
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered meanwhile is put on the meta device at once (before any
    initialisation writes it); buffers stay where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@torch.no_grad()
def _materialize(model: nn.Module) -> None:
    """Allocate every meta parameter on the CPU (a tied or shared one once: the gate keeps
    sharing the router's weight) and zero every meta buffer
    (the layers' own: counters and selection biases, which start at zero; a checkpoint's
    selection bias is the router's buffer, real, shared with the gate by `convert`)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.zeros_like(buffer, device="cpu")


def _files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has neither model.safetensors nor "
                              "model.safetensors.index.json (write it with save_pretrained)")
    with open(single, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: single for k in header if k != "__metadata__"}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _Reader:
    """Tensors, or rows [lo, hi) of them, read from safetensors files with plain reads into
    fresh tensors: no memory map, so a process holds only what it read (its peak memory is
    what it keeps, which the sharded loading is for)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._headers: dict[Path, tuple[int, dict]] = {}

    def _entry(self, key: str) -> tuple[Path, int, dict]:
        file = self.files[key]
        if file not in self._headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = (8 + size, json.loads(f.read(size)))
        start, header = self._headers[file]
        if key not in header:
            raise CheckpointError(f"{key} is listed for {file.name} but is not in it")
        return file, start, header[key]

    def tensor(self, key: str) -> torch.Tensor:
        return self.rows(key, 0, None)

    def rows(self, key: str, lo: int, hi: int | None) -> torch.Tensor:
        file, start, entry = self._entry(key)
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        hi = shape[0] if hi is None else hi
        row = (end - begin) // shape[0] if shape else end - begin
        shape = [hi - lo, *shape[1:]] if shape else shape
        out = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(start + begin + lo * row)
            read = f.readinto(out.view(-1).view(torch.uint8).numpy())
        if read != out.numel() * out.element_size():
            raise CheckpointError(f"{file} ends inside {key}: the file is truncated")
        return out


@torch.no_grad()
def _load(model: nn.Module, path: Path, model_type: str) -> None:
    """Fill the materialised model from the checkpoint at `path`: each block's experts of this
    rank, then every other tensor under its own name; raise CheckpointError for what is
    missing or shaped otherwise."""
    files = _files(path)
    renames = _RENAMES.get(model_type, ())
    disk = {}  # module-side name -> disk name
    for key in files:
        name = key
        for old, new in renames:
            name = name.replace(old, new)
        disk[name] = key
    reader = _Reader(files)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    loaded: set[int] = set()
    targets = {**dict(model.named_parameters(remove_duplicate=False)),
               **{n: b for n, b in model.named_buffers(remove_duplicate=False)}}
    for name, block in blocks.items():
        _load_block(block, name, model_type, disk, reader, loaded)
    for name, tensor in targets.items():
        if id(tensor) in loaded or any(name.startswith(f"{b}.moe.") for b in blocks):
            continue
        if name in disk:
            value = reader.tensor(disk[name])
            if value.shape != tensor.shape:
                raise CheckpointError(f"{disk[name]} has shape {tuple(value.shape)}, the "
                                      f"model's {name} {tuple(tensor.shape)}: the checkpoint "
                                      "is of another model")
            tensor.copy_(value)
            loaded.add(id(tensor))
    persistent = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        n for n in model.state_dict() if n in targets}
    missing = sorted(n for n in persistent if id(targets[n]) not in loaded)
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) of the model are not in the checkpoint "
                              f"at {path} (first: {', '.join(missing[:3])}); it is incomplete or "
                              "of another model")


def _load_block(block: HFMoEBlock, name: str, model_type: str, disk: dict[str, str],
                reader: _Reader, loaded: set[int]) -> None:
    """This rank's experts of one block (and its shared experts and their gate)."""
    layer, family = block.moe, block.family
    lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
    prefix = f"{name}.experts."
    fused = f"{prefix}gate_up_proj" in disk  # [E, ...] on disk, as the module holds them
    gate, up, down = _PER_EXPERT.get(model_type, _DEFAULT_PER_EXPERT)
    for e in range(lo, hi):  # one expert at a time: what is read is copied and dropped
        if not fused:  # the hub's Linear weights [out, in], straight into our rows
            _hub_expert(layer.experts, e - lo, {
                role: reader.tensor(_disk_key(disk, f"{prefix}{e}.{part}.weight", name))
                for role, part in zip(("gate", "up", "down"), (gate, up, down))})
            loaded.update(id(p) for p in layer.experts.parameters())
            continue
        theirs = {k: reader.rows(disk[prefix + k], e, e + 1) for k in _FUSED
                  if prefix + k in disk}
        for key, value in expert_tensors(SimpleNamespace(**theirs), family.layout, 0,
                                         1).items():
            param = getattr(layer.experts, key)
            if param.shape[1:] != value.shape[1:]:
                raise CheckpointError(f"{prefix}{e}: expected {key} rows of shape "
                                      f"{tuple(param.shape[1:])}, the checkpoint gives "
                                      f"{tuple(value.shape[1:])}")
            param[e - lo].copy_(value[0])
            loaded.add(id(param))
    if family.shared is not None:
        parts = {p: SimpleNamespace(weight=reader.tensor(
            _disk_key(disk, f"{name}.{family.shared}.{p}.weight", name)))
                 for p in ("gate_proj", "up_proj", "down_proj")}
        for key, value in shared_tensors(SimpleNamespace(**parts)).items():
            param = getattr(layer.shared.mlp, key)
            param.copy_(value)
            loaded.add(id(param))
    if family.shared_gate is not None:
        layer.shared.gate_1M.copy_(reader.tensor(
            _disk_key(disk, f"{name}.{family.shared_gate}.weight", name)))
        loaded.add(id(layer.shared.gate_1M))


@torch.no_grad()
def _hub_expert(experts: nn.Module, row: int, weights: dict[str, torch.Tensor]) -> None:
    """One expert from the hub's per-projection Linear weights (gate and up [I, M], down
    [M, I]) into row `row` of our fused SwiGLU storage (families.py: `gate_rows`): w13 [M, 2I]
    gate columns first, w2 [I, M]."""
    w13_M2H, w2_HM = experts.w13_EM2H[row], experts.w2_EHM[row]
    hidden = w13_M2H.shape[1] // 2
    for role, value, target in (("gate", weights["gate"], w13_M2H[:, :hidden]),
                                ("up", weights["up"], w13_M2H[:, hidden:]),
                                ("down", weights["down"], w2_HM)):
        if value.t().shape != target.shape:
            raise CheckpointError(f"an expert's {role} projection has shape "
                                  f"{tuple(value.shape)}, this model's is "
                                  f"{tuple(target.t().shape)}")
        target.copy_(value.t())


def _disk_key(disk: dict[str, str], key: str, block: str) -> str:
    """The name on disk of `key` (module-side), or a CheckpointError naming it."""
    if key not in disk:
        raise CheckpointError(f"{key} is not in the checkpoint (needed by this rank's part of "
                              f"{block})")
    return disk[key]


def _agree(problem: str | None) -> None:
    """Raise the first rank's problem as CheckpointError on every rank."""
    problems = [problem]
    if dist.is_available() and dist.is_initialized():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    for rank, found in enumerate(problems):
        if found is not None:
            where = f" (found by rank {rank})" if len(problems) > 1 else ""
            raise CheckpointError(f"from_pretrained: {found}{where}")
