"""`MoELayer`: a drop-in mixture-of-experts block with expert parallelism.

Legend: T tokens on this rank, M model dim, E experts (global), W ranks in the EP group,
C capacity (slots per expert), K top-k.

One call: route -> encode -> [scheduler: compress -> A2A -> decompress -> experts ->
compress -> A2A -> decompress] -> decode. Before the exchange, the ranks swap one small vector
(config fingerprint, input problems, capacity) so that a bad input or a mismatched config on any
rank raises on every rank instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import EPGroup, all_gather_ints
from .dispatch import capacity_limit, check_drop_policy, decode, encode, locate, make_plan
from .errors import ConfigError, ConfigMismatchError, InputError
from .ops.codec_set import CodecSet
from .ops.compressor import Compressor
from .ops.experts import mark_expert_parameters
from .registry import registry
from .schedulers.base import Scheduler, StepContext
from .recorder import StepRecorder


@dataclass
class MoEConfig:
    """Everything that defines an MoE layer; must be identical on every rank of the EP group."""

    model_dim: int
    num_experts: int
    hidden_dim: int
    top_k: int = 2
    capacity_factor: float = 1.0
    drop_policy: str = "position"
    expert: str | type = "ffn"
    activation: str | Callable | None = None  # None: the expert's default
    a2a: str | type = "nccl"
    local_size: int | None = None  # ranks per node for hierarchical A2A; None: LOCAL_WORLD_SIZE
    compressor: str | type | Compressor | dict = "none"  # one codec, or per exchange
    scheduler: str | type | Scheduler = "sequential"  # a name, class or configured instance
    gate: str | type = "topk"
    normalize_weights: bool = True
    gate_noise: float = 0.0
    z_loss_weight: float = 0.0
    check_finite: bool = False  # scan the input for NaN/Inf every call (costs a reduction)
    allow_empty: bool = True  # False: a rank with no tokens is an error instead of a no-op
    trace: bool = False  # record every op's interval in last_stats.events

    def validate(self, world_size: int) -> None:
        for name in ("model_dim", "num_experts", "hidden_dim", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_experts % world_size:
            raise ConfigError(
                f"num_experts ({self.num_experts}) must be divisible by the EP group size "
                f"({world_size}); each rank owns num_experts / world_size experts"
            )
        if not math.isfinite(self.capacity_factor):
            raise ConfigError(f"capacity_factor must be finite, got {self.capacity_factor}")
        check_drop_policy(self.drop_policy)

    def fingerprint(self) -> dict[str, int]:
        """Integers that must agree across ranks (names are hashed, floats bit-cast)."""
        names = [_spec_name(getattr(self, f)) for f in
                 ("expert", "activation", "a2a", "scheduler", "gate", "drop_policy")]
        names.append(CodecSet.build(self.compressor).describe())
        return {
            "model_dim": self.model_dim,
            "num_experts": self.num_experts,
            "hidden_dim": self.hidden_dim,
            "top_k": self.top_k,
            "local_size": self.local_size or 0,
            "capacity_factor": struct.unpack("<q", struct.pack("<d", self.capacity_factor))[0],
            "plugin names (expert/activation/a2a/scheduler/gate/drop_policy/compressor)":
                zlib.crc32("|".join(names).encode()),
        }


def _spec_name(spec: object) -> str:
    if spec is None or isinstance(spec, str):
        return str(spec)
    if hasattr(spec, "describe") and not isinstance(spec, type):
        return spec.describe()
    return f"{getattr(spec, '__module__', '')}.{getattr(spec, '__qualname__', repr(spec))}"


@dataclass
class LayerStats:
    """What the last forward did on this rank."""

    tokens: int  # T
    capacity: int  # C of the exchanged buffer (max over ranks)
    limit: int  # this rank's own capacity limit
    counts: list[int]  # (token, choice) pairs routed to each global expert, before dropping
    dropped_per_expert: list[int]
    processed: int  # pairs that reached an expert
    dropped: int  # pairs dropped; processed + dropped == tokens * top_k
    kept_TK: torch.Tensor = field(repr=False)  # bool [T, K]: which (token, choice) pairs were kept
    schedule: dict = field(repr=False)  # what the scheduler decided for this call (adaptive)
    timer: StepRecorder = field(repr=False)

    @property
    def op_ms(self) -> dict[str, float]:
        """Milliseconds per op; backward ops (`*.bwd`) appear once backward has run."""
        return self.timer.milliseconds()

    @property
    def events(self) -> list:
        """(task, chunk, stream, start, end) of every op, if the layer was built with trace=True."""
        return list(self.timer.events or [])

    @property
    def wire_bytes(self) -> dict[str, tuple[int, int]]:
        """(payload bytes, bytes on the wire) sent by this rank per exchange, backward included."""
        return {name: (raw, wire) for name, (raw, wire) in self.timer.bytes.items()}


# Error codes carried in the per-step metadata, so every rank can report another's problem.
_OK, _BAD_SHAPE, _BAD_DTYPE, _NON_FINITE, _EMPTY, _NOT_TENSOR = 0, 1, 2, 3, 4, 5
_PROBLEMS = {_NOT_TENSOR: "a {} instead of a torch.Tensor", _BAD_SHAPE: "last dimension {} instead of model_dim",
             _BAD_DTYPE: "a non-floating dtype", _NON_FINITE: "NaN or Inf values",
             _EMPTY: "no tokens"}


class MoELayer(nn.Module):
    """Mixture-of-experts layer with expert parallelism over `group`.

    `forward(x)` takes `[..., model_dim]` and returns the same shape; the aux loss is
    `layer.aux_loss` and `y.l_aux` (GShard balance loss + z_loss_weight * z-loss).
    Each rank owns experts `[rank * E/W, (rank + 1) * E/W)`; their parameters carry
    `param.expert = True` and `param.allreduce = False` for data-parallel wrappers.
    """

    def __init__(self, model_dim: int, num_experts: int, hidden_dim: int, top_k: int = 2,
                 capacity_factor: float = 1.0, *, group: dist.ProcessGroup | None = None,
                 **options) -> None:
        super().__init__()
        self.config = MoEConfig(model_dim, num_experts, hidden_dim, top_k, capacity_factor,
                                **options)
        self.group = EPGroup.resolve(group)
        cfg = self.config
        cfg.validate(self.group.size)
        self.num_local_experts = cfg.num_experts // self.group.size
        self.expert_offset = self.group.rank * self.num_local_experts

        self.gate = registry("gate").resolve(cfg.gate)(
            model_dim, num_experts, top_k, normalize_weights=cfg.normalize_weights,
            noise_std=cfg.gate_noise)
        expert_args = {} if cfg.activation is None else {"activation": cfg.activation}
        self.experts = registry("expert").resolve(cfg.expert)(
            self.num_local_experts, model_dim, hidden_dim, **expert_args)
        mark_expert_parameters(self.experts)
        self.a2a = registry("a2a").resolve(cfg.a2a)(self.group, cfg.local_size)
        self.codecs = CodecSet.build(cfg.compressor)
        self.scheduler = (cfg.scheduler if isinstance(cfg.scheduler, Scheduler)
                          else registry("scheduler").resolve(cfg.scheduler)())

        self.aux_loss: torch.Tensor | None = None
        self.last_stats: LayerStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        device = next(self.parameters()).device
        timer = StepRecorder(device, trace=cfg.trace)
        problem, detail = self._check_input(x)
        num_tokens, limit = 0, 0
        if problem == _OK:
            x_TM = x.reshape(-1, cfg.model_dim)
            num_tokens = x_TM.shape[0]
            with timer("route"):
                routing = self.gate(x_TM)
                priority_T = (routing.weight_TK[:, 0].detach()
                              if cfg.drop_policy == "probability" else None)
                slot_TK, counts_E = locate(routing.expert_TK, cfg.num_experts, priority_T)
                needed = int(counts_E.max()) if num_tokens else 0
                limit = capacity_limit(cfg.capacity_factor, cfg.top_k, num_tokens,
                                       cfg.num_experts, needed)
        fingerprint = cfg.fingerprint()
        meta_WF = all_gather_ints([*fingerprint.values(), problem, detail, limit], self.group,
                                  device, "the per-step metadata exchange of MoELayer")
        self._raise_on_problems(meta_WF, fingerprint, problem, detail)
        capacity = int(meta_WF[:, -1].max())

        with timer("encode"):
            plan = make_plan(routing.expert_TK, routing.weight_TK, slot_TK, counts_E, limit,
                             capacity)
            x_ECM = encode(x_TM, plan)
        ctx = StepContext(self.experts, self.a2a, self.codecs, timer)
        x_WECM = x_ECM.view(self.group.size, self.num_local_experts, capacity, cfg.model_dim)
        y_WECM = self.scheduler.run(x_WECM, ctx)
        with timer("decode"):
            y_TM = decode(y_WECM.view(cfg.num_experts, capacity, cfg.model_dim), plan, num_tokens)

        aux = routing.balance_loss + cfg.z_loss_weight * routing.z_loss
        self.aux_loss = aux
        self.last_stats = LayerStats(num_tokens, capacity, limit, counts_E.tolist(),
                                     plan.dropped_E.tolist(), plan.kept, plan.dropped, plan.kept_TK,
                                     ctx.notes, timer)
        y = y_TM.view(x.shape)
        y.l_aux = aux  # Tutel's convention
        return y

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """(problem code, detail) for this rank's input; raising is left to after the sync."""
        if not isinstance(x, torch.Tensor):
            return _NOT_TENSOR, 0
        if x.dim() == 0 or x.shape[-1] != self.config.model_dim:
            return _BAD_SHAPE, (x.shape[-1] if x.dim() else -1)
        if not x.is_floating_point():
            return _BAD_DTYPE, 0
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            return _NON_FINITE, 0
        if x.numel() == 0 and not self.config.allow_empty:
            return _EMPTY, 0
        return _OK, 0

    def _raise_on_problems(self, meta_WF: torch.Tensor, fingerprint: dict[str, int],
                           problem: int, detail: int) -> None:
        for column, name in enumerate(fingerprint):
            values = meta_WF[:, column].tolist()
            if len(set(values)) > 1:
                shown = values if "names" not in name else "differ by rank"
                raise ConfigMismatchError(
                    f"{name} differs across the ranks of the EP group ({shown}; this is "
                    f"{self.group.describe()}). Build MoELayer with the same arguments on every rank."
                )
        if problem != _OK:
            raise InputError(self._describe_problem(problem, detail, "this rank's input has")
                             + self._input_hint(problem))
        codes = meta_WF[:, len(fingerprint)].tolist()
        bad = [r for r, code in enumerate(codes) if code != _OK]
        if bad:
            r = bad[0]
            what = self._describe_problem(codes[r], int(meta_WF[r, len(fingerprint) + 1]),
                                          f"rank {r}'s input has")
            raise InputError(f"{what}; every rank of the EP group stops (ranks with bad input: "
                             f"{bad}). Fix the input on those ranks.")

    def _describe_problem(self, code: int, detail: int, prefix: str) -> str:
        text = _PROBLEMS[code].format("non-tensor" if code == _NOT_TENSOR else detail)
        if code == _BAD_SHAPE:
            text += f" ({self.config.model_dim})"
        return f"{prefix} {text}"

    def _input_hint(self, code: int) -> str:
        return {
            _NOT_TENSOR: ": call the layer with a tensor shaped [..., model_dim]",
            _BAD_SHAPE: f": pass a tensor shaped [..., {self.config.model_dim}]",
            _BAD_DTYPE: ": pass float32, float16 or bfloat16 activations",
            _NON_FINITE: ": the input holds NaN/Inf (check_finite=True found it)",
            _EMPTY: ": pass at least one token, or build the layer with allow_empty=True",
        }[code]

    def extra_repr(self) -> str:
        c = self.config
        return (f"model_dim={c.model_dim}, num_experts={c.num_experts} "
                f"({self.num_local_experts} local), hidden_dim={c.hidden_dim}, top_k={c.top_k}, "
                f"capacity_factor={c.capacity_factor}, a2a={_spec_name(c.a2a)}, "
                f"compressor={self.codecs.describe()}, scheduler={_spec_name(c.scheduler)}")


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters owned by one EP rank (keep them out of data-parallel all-reduce)."""
    return [p for p in model.parameters() if getattr(p, "expert", False)]


def non_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated across ranks (gate and the rest of the model)."""
    return [p for p in model.parameters() if not getattr(p, "expert", False)]
