"""A layer's options: `MoEConfig`, their canonical form (a string per option that is equal on
two ranks iff the option means the same there, what the ranks agree on), and the objects built
from them (scheduler, codecs, A2A algorithm).

Canonical options: an option is compared by what it means, not how it was spelled: registry
names and classes map to one name, `"pipeline"` and `PipelineScheduler(2)` both describe as
`pipeline(degree=2)`, floats print as floats. Callables are compared by module, name, bytecode,
defaults and closure values, so two different lambdas differ and the same function defined on
every rank agrees; a callable with no stable identity (its repr shows a memory address) is
refused with ConfigError.

Options may change between calls (`layer.config.capacity_factor = ...`): `MoEConfig` counts the
assignments (`version`) so the layer re-reads them; those in FIXED_OPTIONS shape the parameters
and cannot change once a layer is built.
"""

from __future__ import annotations

import enum
import math
import types
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from ..a2a_algos.base import A2AAlgorithm
from ..comm.groups import EPGroup
from ..errors import ConfigError
from ..ops.codecs.codec_set import CodecSet
from ..ops.experts import activation_name
from ..registry import registry
from ..routing.balance import BALANCE_LOSSES
from ..routing.capacity import check_drop_policy


def canonical(spec: Any, kind: str | None = None) -> str:
    """A string that is equal on two ranks iff `spec` means the same there."""
    if spec is None or isinstance(spec, (str, bool, int)):
        return repr(spec)
    if isinstance(spec, float):
        return repr(float(spec))
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k!r}: {canonical(v)}" for k, v in sorted(spec.items())) + "}"
    if isinstance(spec, type):
        if kind is not None:
            name = registry(kind).name_of(spec)
            if name is not None:
                return repr(name)
        return f"{spec.__module__}.{spec.__qualname__}"
    describe = getattr(spec, "describe", None)
    if callable(describe):
        return describe()
    if callable(spec):
        return _callable_identity(spec)
    raise ConfigError(f"cannot compare option {spec!r} across ranks: pass a name, a class or "
                      "an object with describe()")


def _callable_identity(fn: Callable) -> str:
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if isinstance(code, types.CodeType):
        parts = [_code_identity(code), repr(getattr(fn, "__defaults__", None))]
        for cell in getattr(fn, "__closure__", None) or ():
            parts.append(_value_identity(cell.cell_contents))
        return f"{name}#{zlib.crc32('|'.join(parts).encode()):08x}"
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return name
    text = repr(fn)
    if " at 0x" in text:
        raise ConfigError(
            f"the callable {text} has no identity that can be compared across ranks: pass a "
            "registered name, a module-level function, or an object whose repr shows its "
            "settings")
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{text}"


def _code_identity(code: types.CodeType) -> str:
    consts = [_code_identity(c) if isinstance(c, types.CodeType) else repr(c)
              for c in code.co_consts]
    return f"{code.co_code.hex()}:{consts}:{code.co_names}"


def _value_identity(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum)):
        return repr(value)
    if callable(value):
        return _callable_identity(value)
    return type(value).__qualname__


# Options that shape the parameters or the gate: fixed once the layer is built.
FIXED_OPTIONS = ("model_dim", "num_experts", "hidden_dim", "top_k", "expert", "expert_options",
                 "activation", "gate", "gate_options", "normalize_weights", "gate_noise",
                 "shared_hidden_dim", "num_shared_experts", "shared_gate", "redundant_slots")


@dataclass
class MoEConfig:
    """Everything that defines an MoE layer; must be identical on every rank of the EP group.
    A layer re-reads its config when a field is set (`version` counts the sets)."""

    model_dim: int
    num_experts: int
    hidden_dim: int
    top_k: int = 2
    capacity_factor: float = 1.0
    ragged: bool = True  # rows without padding; False: padded [E, C, M] (shapes known early)
    drop_policy: str = "position"
    expert: str | type = "ffn"
    activation: str | Callable | None = None  # None: the expert's default
    a2a: str | type = "nccl"
    local_size: int | None = None  # nodes for hierarchical A2A: None from the hosts (topology.py)
    compressor: str | type | Any = "none"  # a name, class or Compressor; or a dict per exchange
    scheduler: str | type | Any = "sequential"  # a name, class or configured Scheduler
    gate: str | type = "topk"
    normalize_weights: bool = True
    gate_noise: float = 0.0
    gate_options: dict = field(default_factory=dict)  # the gate's own options (num_groups, ...)
    balance_loss: str = "gshard"  # "gshard", "topk", "sequence" or "global" (routers/balance.py)
    expert_options: dict = field(default_factory=dict)  # the expert form's (bias, limit, ...)
    input_jitter: float = 0.0  # training: x *= U(1 - j, 1 + j) before routing (Mixtral)
    shared_hidden_dim: int = 0  # hidden size of each shared expert; 0: none
    num_shared_experts: int = 1  # run as one MLP of num_shared_experts * shared_hidden_dim
    shared_gate: bool = False  # scale the shared output by sigmoid(x @ w) (Qwen2-MoE)
    z_loss_weight: float = 0.0
    check_finite: bool = False  # scan the input for NaN/Inf every call (costs a reduction)
    allow_empty: bool = True  # False: a rank with no tokens is an error instead of a no-op
    trace: bool = False  # record every op's interval in last_stats.events
    verify: bool = False  # a checksum on every payload slice, checked on arrival
    redundant_slots: int = 0  # replica slots a rank for hot experts (plan/placement.py)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "version", self.__dict__.get("version", 0) + 1)

    def validate(self, world_size: int) -> None:
        for name in ("model_dim", "num_experts", "hidden_dim", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.shared_hidden_dim, int) or self.shared_hidden_dim < 0:
            raise ConfigError(f"shared_hidden_dim must be an int >= 0, got "
                              f"{self.shared_hidden_dim!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 1:
            raise ConfigError(f"num_shared_experts must be an int >= 1, got "
                              f"{self.num_shared_experts!r}")
        if not 0 <= self.input_jitter < 1:
            raise ConfigError(f"input_jitter must be in [0, 1), got {self.input_jitter}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_experts % world_size:
            raise ConfigError(
                f"num_experts ({self.num_experts}) must be divisible by the EP group size "
                f"({world_size}); each rank owns num_experts / world_size experts"
            )
        n = self.num_experts // world_size
        if not isinstance(self.redundant_slots, int) or isinstance(self.redundant_slots, bool) \
                or self.redundant_slots < 0 or (self.redundant_slots and (
                    world_size < 2 or self.redundant_slots > self.num_experts - n)):
            raise ConfigError(f"redundant_slots must be an int in [0, {self.num_experts - n}] "
                              f"(the experts a rank does not hold), on 2 or more ranks; got "
                              f"{self.redundant_slots!r} on {world_size}")
        if not math.isfinite(self.capacity_factor):
            raise ConfigError(f"capacity_factor must be finite, got {self.capacity_factor}")
        check_drop_policy(self.drop_policy)
        if self.balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"balance_loss must be one of {BALANCE_LOSSES}, got "
                              f"{self.balance_loss!r}")

    def canonical(self, codecs: CodecSet, scheduler: Any, a2a: A2AAlgorithm) -> dict[str, str]:
        """Every option as a string that is equal on two ranks iff it means the same there
        (names and classes alike, defaults resolved); what the ranks agree on. The codecs,
        scheduler and A2A are the live objects (which may have been assigned directly)."""
        options = {name: canonical(getattr(self, name)) for name in (
            "model_dim", "num_experts", "hidden_dim", "top_k", "drop_policy",
            "normalize_weights", "check_finite", "allow_empty", "gate_options", "ragged",
            "expert_options", "shared_hidden_dim", "num_shared_experts", "shared_gate",
            "balance_loss", "redundant_slots")}
        options.update({name: canonical(float(getattr(self, name)))  # 1 and 1.0 agree
                        for name in ("capacity_factor", "gate_noise", "z_loss_weight",
                                     "input_jitter")})
        options.update(expert=canonical(self.expert, "expert"), gate=canonical(self.gate, "gate"),
                       activation=canonical(activation_name(self.activation)),
                       a2a=canonical(type(a2a), "a2a"), local_size=canonical(a2a.local_size),
                       compressor=codecs.describe(), scheduler=scheduler.describe())
        return options


def build_scheduler(spec: Any) -> Any:
    """The scheduler `spec` names: a registered name or class (built with its defaults), or a
    configured instance (used as is)."""
    scheduler = registry("scheduler")
    return spec if isinstance(spec, scheduler.base) else scheduler.resolve(spec)()


def build_a2a(cfg: MoEConfig, group: EPGroup) -> A2AAlgorithm:
    return registry("a2a").resolve(cfg.a2a)(group, cfg.local_size)


def build_codecs(cfg: MoEConfig) -> CodecSet:
    return CodecSet.build(cfg.compressor, verify=cfg.verify)


def sources(cfg: MoEConfig) -> dict[str, object]:
    """The config values the scheduler, codecs and A2A are built from."""
    return {"scheduler": cfg.scheduler, "codecs": (cfg.compressor, cfg.verify),
            "a2a": (cfg.a2a, cfg.local_size)}


def same(a: object, b: object) -> bool:
    """The same value: the same object, or equal plain values (a new instance differs)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    plain = (str, int, float, bool, type(None), dict)
    return a is b or (type(a) is type(b) and isinstance(a, plain) and a == b)


_LAYERS_BUILT: dict[tuple[int, ...], int] = {}  # EP group (global ranks) -> layers built on it


def next_layer_index(group: EPGroup) -> int:
    """The next layer's place in the construction order of `group`'s layers (the same on every
    rank that builds the model alike)."""
    key = tuple(dist.get_process_group_ranks(group.pg)) if group.distributed else ()
    index = _LAYERS_BUILT.get(key, 0)
    _LAYERS_BUILT[key] = index + 1
    return index
