"""`MoELayer`: a drop-in mixture-of-experts block with expert parallelism.

Legend: T tokens on this rank, M model dim, E experts (global), W ranks in the EP group,
C capacity (slots per expert), K top-k.

One call: route -> agree -> encode -> [scheduler: compress -> A2A -> decompress -> experts ->
compress -> A2A -> decompress] -> decode. Every call the ranks swap one small record
(`agreement.py`: options, input dtype/device/autograd state, problems, capacity limit) so that a
bad input, a local failure or a mismatched config on any rank raises on every rank instead of
leaving the others waiting in a collective. In fixed-capacity mode, once the calls repeat, the
record rides on the first dispatch instead of costing a collective of its own.

Options may change between calls, on every rank alike: `layer.scheduler = ...`,
`layer.codecs = ...`, `layer.a2a = ...`, `layer.config.capacity_factor = ...` (or any other
field but those in FIXED_OPTIONS, which shape the parameters). The layer re-reads them at its
next call (rebuilding the scheduler, codecs or A2A if their config field changed) and the
agreement checks them there: a change on one rank only raises ConfigMismatchError on every rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .a2a_algos.base import A2AAlgorithm
from .agreement import (BAD_DEVICE, BAD_DTYPE, BAD_SHAPE, EMPTY, FAILED, NON_FINITE,
                        NOT_TENSOR, OK, RECONFIGURED, Agreed, Agreement, LocalStep, Misguessed,
                        Rider, canonical)
from .distributed import EPGroup
from .dispatch import (DispatchPlan, capacity_limit, check_drop_policy, decode, encode,
                       layout_hash, locate, make_plan, make_ragged_plan)
from .layout import PaddedLayout, RaggedLayout
from .errors import ConfigError
from .ops.codec_set import CodecSet
from .ops.compressor import Compressor
from .ops.experts import activation_name, mark_expert_parameters
from .ops.shared import SharedExperts
from .overlap import turns
from .parallel.identity import load_expert_range, save_expert_range
from .routers.balance import BALANCE_LOSSES, balance_loss
from .registry import registry
from .schedulers.base import Scheduler, SharedWork, StepContext
from .recorder import StepRecorder


# Options that shape the parameters or the gate: fixed once the layer is built.
FIXED_OPTIONS = ("model_dim", "num_experts", "hidden_dim", "top_k", "expert", "expert_options",
                 "activation", "gate", "gate_options", "normalize_weights", "gate_noise",
                 "shared_hidden_dim", "num_shared_experts", "shared_gate")


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
    compressor: str | type | Compressor | dict = "none"  # one codec, or per exchange
    scheduler: str | type | Scheduler = "sequential"  # a name, class or configured instance
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
        if not math.isfinite(self.capacity_factor):
            raise ConfigError(f"capacity_factor must be finite, got {self.capacity_factor}")
        check_drop_policy(self.drop_policy)
        if self.balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"balance_loss must be one of {BALANCE_LOSSES}, got "
                              f"{self.balance_loss!r}")

    def canonical(self, codecs: CodecSet, scheduler: Scheduler,
                  a2a: A2AAlgorithm) -> dict[str, str]:
        """Every option as a string that is equal on two ranks iff it means the same there
        (names and classes alike, defaults resolved); what the ranks agree on. The codecs,
        scheduler and A2A are the live objects (which may have been assigned directly)."""
        options = {name: canonical(getattr(self, name)) for name in (
            "model_dim", "num_experts", "hidden_dim", "top_k", "drop_policy",
            "normalize_weights", "check_finite", "allow_empty", "gate_options", "ragged",
            "expert_options", "shared_hidden_dim", "num_shared_experts", "shared_gate",
            "balance_loss")}
        options.update({name: canonical(float(getattr(self, name)))  # 1 and 1.0 agree
                        for name in ("capacity_factor", "gate_noise", "z_loss_weight",
                                     "input_jitter")})
        options.update(expert=canonical(self.expert, "expert"), gate=canonical(self.gate, "gate"),
                       activation=canonical(activation_name(self.activation)),
                       a2a=canonical(type(a2a), "a2a"), local_size=canonical(a2a.local_size),
                       compressor=codecs.describe(), scheduler=scheduler.describe())
        return options


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


class MoELayer(nn.Module):
    """Mixture-of-experts layer with expert parallelism over `group`.

    `forward(x)` takes `[..., model_dim]` and returns the same shape; the aux loss is
    `layer.aux_loss` and `y.l_aux` (the `balance_loss` form, GShard's by default, +
    z_loss_weight * z-loss).
    Each rank owns experts `[rank * E/W, (rank + 1) * E/W)`; their parameters carry
    `param.expert = True` and `param.allreduce = False` for data-parallel wrappers (the recipes
    in `schedmoe.parallel` use them). Its state dict records which experts it holds
    (`expert_range`, parallel/identity.py), so that one rank's file cannot load into another
    rank's experts. `balance_group`: the ranks over which the "global" balance loss sums its
    choice counts (default the EP group; the whole data-parallel world makes it the loss of the
    global batch).

    Seed rule: the gate is drawn from the global RNG (identical on every rank seeded alike, as
    data parallelism needs); the experts are drawn from a generator seeded with one draw of the
    global RNG plus the index of the rank's first expert, so each rank's experts differ while
    the global RNG advances by the same amount on every rank (Tutel's per-rank expert seed).
    """

    def __init__(self, model_dim: int, num_experts: int, hidden_dim: int, top_k: int = 2,
                 capacity_factor: float = 1.0, *, group: dist.ProcessGroup | None = None,
                 balance_group: dist.ProcessGroup | None = None, **options) -> None:
        super().__init__()
        self.config = MoEConfig(model_dim, num_experts, hidden_dim, top_k, capacity_factor,
                                **options)
        self.group = EPGroup.resolve(group)
        self.balance_group = self.group.pg if balance_group is None else balance_group
        cfg = self.config
        cfg.validate(self.group.size)
        self.num_local_experts = cfg.num_experts // self.group.size
        self.expert_offset = self.group.rank * self.num_local_experts

        self.gate = registry("gate").resolve(cfg.gate)(
            model_dim, num_experts, top_k, normalize_weights=cfg.normalize_weights,
            noise_std=cfg.gate_noise, **cfg.gate_options)
        expert_seed = int(torch.randint(0, 2 ** 62, ())) + self.expert_offset
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        expert_cls = registry("expert").resolve(cfg.expert)
        expert_args = dict(cfg.expert_options)
        if cfg.activation is not None:
            expert_args["activation"] = cfg.activation
        with torch.random.fork_rng(devices=gpus):  # every RNG the experts may draw from
            torch.manual_seed(expert_seed)
            self.experts = expert_cls(self.num_local_experts, model_dim, hidden_dim,
                                      **expert_args)
        mark_expert_parameters(self.experts)
        # Shared experts are replicated like the gate: drawn from the global RNG. n experts of
        # hidden size H are one MLP of n * H (their hidden units side by side, outputs summed).
        shared_dim = cfg.num_shared_experts * cfg.shared_hidden_dim
        self.shared = SharedExperts(expert_cls(1, model_dim, shared_dim, **expert_args),
                                    cfg.shared_gate) if shared_dim else None
        self.a2a = _build_a2a(cfg, self.group)
        self.codecs = CodecSet.build(cfg.compressor, verify=cfg.verify)
        self.scheduler = _build_scheduler(cfg.scheduler)
        # The config values the live scheduler, codecs and A2A were built from: a new value
        # rebuilds them at the next call (_refresh).
        self._built_from = _sources(cfg)
        # Which layer this is: its place in the order in which this EP group's layers were
        # built, the same on every rank that builds the model alike. It is in the per-call
        # record, so a call that pairs different layers across ranks raises ConfigMismatchError.
        self.layer_index = _next_layer_index(self.group)
        options = self._options()
        self._fixed = {name: options[name] for name in FIXED_OPTIONS}
        self._agreement = Agreement(self.group, options, cfg.num_experts)
        self._changes = 0  # assignments of scheduler, codecs, a2a or config (__setattr__)
        self._options_key = self._key()  # what the options were last read from

        # Ragged rows (no padding) unless asked to pad: the split sizes ride in the per-call
        # agreement (dropless swaps them anyway). Fixed capacity with error feedback keeps the
        # padded layout, whose residuals belong to fixed slots.
        self.ragged = self._wants_ragged()
        # The scheduler, codecs and A2A the last call ran, with shallow copies taken then (~4
        # us): a rank whose options changed since sends its placeholders through them, so
        # that its exchanges match the others' (agreement.py).
        self._ran_key = self._call_key = self._options_key  # the options at the last call
        self._ran = self._live(), self._snapshot()
        self._agreed: Agreed | None = None  # what the last call agreed
        self._guess: Agreed | None = None  # what the next call is guessed to agree

        # (aux loss, stats) of the last call: under None that of any caller, under i that of
        # micro-batch i of an interleaved step (overlap/turns.py), which calls in turns.
        self._last: dict[int | None, tuple[torch.Tensor | None, LayerStats | None]] = {}
        # Which experts this rank's state dict holds (parallel/identity.py).
        self.register_state_dict_post_hook(save_expert_range)
        self.register_load_state_dict_pre_hook(load_expert_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # Inside a backward pass, a forward is an activation checkpoint's recompute: it must
        # repeat the decisions of the forward it recomputes, and leaves the stats alone.
        recompute = torch._C._current_graph_task_id() != -1
        device = next(self.parameters()).device
        timer = StepRecorder(device, trace=cfg.trace)
        if cfg.input_jitter and self.training and isinstance(x, torch.Tensor):
            x = x * torch.empty_like(x).uniform_(1 - cfg.input_jitter, 1 + cfg.input_jitter)
        local, routed = self._route(x, device, timer)
        guess = self._guess if self._can_guess() else None
        if guess is None:
            agreed = self._agree(local, device, timer)
            plan, y_WECM, ctx = self._exchange(x, local, routed, agreed, timer, recompute)
        else:
            running = None  # the live scheduler, codecs and A2A
            if self._call_key != self._ran_key:  # the others may still run the last call's
                running = self._as_ran()
                if local.problem == OK:
                    local.problem = RECONFIGURED  # placeholders; see agreement.py
            rider = self._agreement.rider(local, guess)
            try:
                plan, y_WECM, ctx = self._exchange(x, local, routed, guess, timer, recompute,
                                                   rider=rider, running=running)
                agreed = rider.agreed
            except Misguessed as miss:  # every rank alike: run the call at the agreed shapes
                timer = StepRecorder(device, trace=cfg.trace)
                if miss.resync:  # every rank's options changed alike: agree on the new ones
                    local.problem = OK
                    agreed = self._agree(local, device, timer)
                else:
                    agreed = miss.agreed
                plan, y_WECM, ctx = self._exchange(x, local, routed, agreed, timer, recompute)
        # Guess the next call only once two calls in a row agreed alike (a capacity that
        # changes every call is swapped beforehand instead of guessed wrong every time).
        self._guess = agreed if agreed.same_call(self._agreed) and self._may_ride() else None
        self._agreed = agreed
        self._ran_key, self._ran = self._call_key, (self._live(), self._snapshot())

        routing = routed[0]
        num_tokens, capacity = plan.kept_TK.shape[0], agreed.capacity
        with timer("decode"):
            y_flat = y_WECM if plan.ragged else y_WECM.view(cfg.num_experts, capacity,
                                                            cfg.model_dim)
            y_TM = decode(y_flat, plan, num_tokens)
        if ctx.shared is not None:  # run now unless the scheduler ran it during its exchanges
            y_TM = y_TM + ctx.shared.run(timer)
        balance = routing.balance_loss
        if balance is None:
            sequences = x.shape[0] if x.dim() == 3 else 1
            balance = balance_loss(cfg.balance_loss, routing.probs_TE, routing.expert_TK,
                                   sequences, self.balance_group)
        aux = balance + cfg.z_loss_weight * routing.z_loss
        if not recompute:
            stats = LayerStats(num_tokens, capacity, local.limit, plan.counts_E.tolist(),
                               plan.dropped_E.tolist(), plan.kept, plan.dropped, plan.kept_TK,
                               ctx.notes, timer)
            self._last[None] = self._last[turns.index()] = (aux, stats)
        y = y_TM.view(x.shape)
        y.l_aux = aux  # Tutel's convention
        return y

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last call's aux loss; inside an interleaved step, the calling micro-batch's."""
        return self._last.get(turns.index(), (None, None))[0]

    @property
    def last_stats(self) -> LayerStats | None:
        """What the last call did on this rank; inside an interleaved step, the calling
        micro-batch's last call."""
        return self._last.get(turns.index(), (None, None))[1]

    def runtime_state(self) -> dict:
        """What this rank's layer carries from call to call beyond its state dict: the
        scheduler's tuning, error-feedback residuals, the router's choice counts since its last
        balancing update. Checkpoints keep it per rank and restore it at the same layout."""
        counts = {name: buffer.clone() for name, buffer in self.gate.named_buffers(recurse=False)
                  if name in self.gate._non_persistent_buffers_set}
        return {"scheduler": self.scheduler.runtime_state(),
                "codecs": self.codecs.runtime_state(), "gate": counts}

    def load_runtime_state(self, state: dict) -> None:
        """Continue from `runtime_state()` of a layer built alike on the same rank."""
        self.scheduler.load_runtime_state(state.get("scheduler", {}))
        self.codecs.load_runtime_state(state.get("codecs", {}))
        with torch.no_grad():
            for name, value in state.get("gate", {}).items():
                getattr(self.gate, name).copy_(value)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("scheduler", "codecs", "a2a", "config") and "_changes" in self.__dict__:
            self._changes += 1  # re-read at the next call

    def _can_guess(self) -> bool:
        """Whether the next call's record rides on its first dispatch (agreement.py): decided
        at the end of the last call, from what every rank agreed, so the same on every rank."""
        return self._guess is not None

    def _may_ride(self) -> bool:
        """Whether this layer's options let records ride: fixed capacity in padded rows, no
        error feedback, a scheduler that carries it, more than one rank."""
        return (self.config.capacity_factor > 0 and not self.ragged
                and not self.codecs.uses_feedback and self.group.distributed
                and type(self.scheduler).carries_agreement)

    def _options(self) -> dict[str, str]:
        options = self.config.canonical(self.codecs, self.scheduler, self.a2a)
        options["layer"] = f"MoE layer #{self.layer_index} built on this EP group"
        return options

    def _wants_ragged(self) -> bool:
        cfg = self.config
        return cfg.ragged and (cfg.capacity_factor <= 0 or self.group.size == 1
                               or not self.codecs.uses_feedback)

    def _key(self) -> tuple:
        """What the options are read from; a different key means an option changed. The
        describe() calls (~3 us) also catch a scheduler, codec or A2A changed in place."""
        return (self._changes, self.config.__dict__.get("version"),
                *(obj.describe() for obj in self._live()))

    def _live(self) -> tuple[Scheduler, CodecSet, A2AAlgorithm]:
        return self.scheduler, self.codecs, self.a2a

    def _snapshot(self) -> tuple:
        return tuple(copy.copy(obj) for obj in self._live())

    def _as_ran(self) -> tuple:
        """The scheduler, codecs and A2A as the last call ran them: the objects themselves
        (their state as the other ranks' is), or the copies if they were changed in place."""
        objects, copies = self._ran
        return tuple(obj if obj.describe() == then.describe() else then
                     for obj, then in zip(objects, copies))

    def _refresh(self) -> None:
        """Re-read the options if one changed since the last call: rebuild the scheduler,
        codecs or A2A whose config field changed, put the new options in the agreement (which
        compares them across the ranks at this call) and refuse changes to FIXED_OPTIONS."""
        self._call_key = self._key()
        if self._call_key == self._options_key:
            return
        cfg = self.config
        built, now = self._built_from, _sources(cfg)
        if not _same(now["scheduler"], built["scheduler"]):
            self.scheduler = _build_scheduler(cfg.scheduler)
        if not _same(now["codecs"], built["codecs"]):
            self.codecs = CodecSet.build(cfg.compressor, verify=cfg.verify)
        if not _same(now["a2a"], built["a2a"]):
            self.a2a = _build_a2a(cfg, self.group)
        self._built_from = now
        options = self._options()
        self._agreement.set_options(options)
        cfg.validate(self.group.size)
        fixed = [name for name in FIXED_OPTIONS if options[name] != self._fixed[name]]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change once the layer is built (they "
                              "shape its parameters); build a new MoELayer instead")
        self.ragged = self._wants_ragged()
        self._options_key = self._call_key = self._key()

    def _agree(self, local: LocalStep, device: torch.device, timer: StepRecorder) -> Agreed:
        """The all-gathered agreement (the error-feedback codecs learn the agreed layout)."""
        with timer("agree"):
            agreed = self._agreement.agree(local, device, local.counts)
        if self.codecs.uses_feedback:
            self.codecs.observe_layout((agreed.capacity, agreed.layouts))
        return agreed

    def _exchange(self, x: torch.Tensor, local: LocalStep, routed: tuple, agreed: Agreed,
                  timer: StepRecorder, recompute: bool, rider: Rider | None = None,
                  running: tuple | None = None) -> tuple[DispatchPlan, torch.Tensor, StepContext]:
        """Encode at the agreed (or guessed) capacity and run the scheduler. A rank whose own
        state does not fit a guess sends zeros of the guessed shape: the rider's check then
        raises on every rank before anything is decoded. `running`: the (scheduler, codecs,
        A2A) to send through, if not the live ones."""
        cfg = self.config
        scheduler, codecs, a2a = running or (self.scheduler, self.codecs, self.a2a)
        capacity = agreed.capacity
        routing, slot_TK, counts_E = routed
        fits = (local.problem == OK and local.limit <= capacity and local.dtype == agreed.dtype
                and local.input_grad <= agreed.input_grad)
        if fits:
            x_TM = x.reshape(-1, cfg.model_dim)
            with timer("encode"):
                if agreed.counts_WE is not None:  # ragged rows, nothing padded
                    plan = make_ragged_plan(routing.expert_TK, routing.weight_TK, slot_TK,
                                            counts_E, local.limit)
                else:
                    plan = make_plan(routing.expert_TK, routing.weight_TK, slot_TK, counts_E,
                                     local.limit, capacity)
                x_ECM = encode(x_TM, plan)
        elif rider is not None:
            plan, x_ECM = None, torch.zeros(cfg.num_experts, capacity, cfg.model_dim,
                                            dtype=getattr(torch, agreed.dtype),
                                            device=next(self.parameters()).device)
        else:
            raise AssertionError("the agreement passed a call that does not fit it")
        if local.graph and agreed.input_grad and not x_ECM.requires_grad:
            # Another rank's input needs a gradient, so its dispatch is differentiated and the
            # backward exchange runs there: take part in it (the gradient here goes nowhere).
            x_ECM = x_ECM.detach().requires_grad_()
        shared = None if self.shared is None or not fits else \
            SharedWork(lambda: self.shared(x.reshape(-1, cfg.model_dim)))
        world, local_experts = self.group.size, self.num_local_experts
        if agreed.counts_WE is not None:
            lo = self.expert_offset
            layout = RaggedLayout(torch.tensor(local.counts).view(world, local_experts),
                                  agreed.counts_WE[:, lo:lo + local_experts], capacity)
            x_WECM = x_ECM
        else:
            layout = PaddedLayout(capacity)
            x_WECM = x_ECM.view(world, local_experts, capacity, cfg.model_dim)
        ctx = StepContext(self.experts, a2a, codecs, timer, layout,
                          recompute=recompute, rider=rider, shared=shared)
        y_WECM = scheduler.run(x_WECM, ctx)
        if rider is not None and rider.agreed is None:
            raise ConfigError(f"{scheduler.describe()} sets carries_agreement but sent no "
                              "dispatch through ctx.dispatch or ctx.start_dispatch")
        if plan is None:
            raise AssertionError("a rank that sent a placeholder passed the agreement")
        return plan, y_WECM, ctx

    def _route(self, x: torch.Tensor, device: torch.device,
               timer: StepRecorder) -> tuple[LocalStep, tuple]:
        """This rank's checks, routing and capacity limit. Nothing raises here: a problem or a
        failure is recorded for the agreement, which raises it on every rank."""
        cfg = self.config
        local = self._check_input(x, device)
        try:
            self._refresh()
        except Exception as exc:  # a bad new option: raised on every rank by the agreement
            if local.problem == OK:
                local.problem, local.error = FAILED, exc
        if self.ragged:
            local.counts = [0] * cfg.num_experts
        if local.problem != OK:
            return local, (None, None, None)
        try:
            with timer("route"):
                x_TM = x.reshape(-1, cfg.model_dim)
                with torch.autocast(x.device.type, enabled=False):  # routing in fp32, always
                    routing = self.gate(x_TM)
                priority_T = (routing.weight_TK[:, 0].detach()
                              if cfg.drop_policy == "probability" else None)
                slot_TK, counts_E = locate(routing.expert_TK, cfg.num_experts, priority_T)
                num_tokens = x_TM.shape[0]
                # Host sync only in dropless mode, whose capacity depends on the routing.
                needed = int(counts_E.max()) if num_tokens and cfg.capacity_factor <= 0 else 0
                local.limit = capacity_limit(cfg.capacity_factor, cfg.top_k, num_tokens,
                                             cfg.num_experts, needed)
                if self.codecs.uses_feedback:
                    local.layout = layout_hash(routing.expert_TK, slot_TK, local.limit)
                if local.counts is not None:  # the ragged exchange's split sizes (host sync)
                    local.counts = counts_E.clamp(max=local.limit).tolist()
        except Exception as exc:  # reported to every rank by the agreement, raised there
            local.problem, local.error = FAILED, exc
            return local, (None, None, None)
        return local, (routing, slot_TK, counts_E)

    def _check_input(self, x: torch.Tensor, device: torch.device) -> LocalStep:
        """This rank's input problems and its autograd state (`device`: the layer's)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            return LocalStep(NOT_TENSOR, note=type(x).__name__)
        local = LocalStep(dtype=str(x.dtype).removeprefix("torch."), device_type=x.device.type)
        local.graph = torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.experts.parameters()))
        local.input_grad = local.graph and x.requires_grad
        if x.device.type != device.type or x.device.type == "meta":
            local.problem, local.note = BAD_DEVICE, repr(x.device.type)
        elif x.dim() == 0 or x.shape[-1] != cfg.model_dim:
            local.problem = BAD_SHAPE
            dim = x.shape[-1] if x.dim() else "none"
            local.note = f"{dim} instead of model_dim ({cfg.model_dim})"
        elif not x.is_floating_point():
            local.problem = BAD_DTYPE
        elif cfg.check_finite and not bool(torch.isfinite(x).all()):
            local.problem = NON_FINITE
        elif x.numel() == 0 and not cfg.allow_empty:
            local.problem = EMPTY
        return local

    def extra_repr(self) -> str:
        c = self.config
        return (f"model_dim={c.model_dim}, num_experts={c.num_experts} "
                f"({self.num_local_experts} local), hidden_dim={c.hidden_dim}, top_k={c.top_k}, "
                f"capacity_factor={c.capacity_factor}, a2a={canonical(c.a2a, 'a2a')}, "
                f"compressor={self.codecs.describe()}, scheduler={self.scheduler.describe()}")


def _build_scheduler(spec: str | type | Scheduler) -> Scheduler:
    return spec if isinstance(spec, Scheduler) else registry("scheduler").resolve(spec)()


def _build_a2a(cfg: MoEConfig, group: EPGroup) -> A2AAlgorithm:
    return registry("a2a").resolve(cfg.a2a)(group, cfg.local_size)


def _sources(cfg: MoEConfig) -> dict[str, object]:
    """The config values the scheduler, codecs and A2A are built from."""
    return {"scheduler": cfg.scheduler, "codecs": (cfg.compressor, cfg.verify),
            "a2a": (cfg.a2a, cfg.local_size)}


def _same(a: object, b: object) -> bool:
    """The same value: the same object, or equal plain values (a new instance differs)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    plain = (str, int, float, bool, type(None), dict)
    return a is b or (type(a) is type(b) and isinstance(a, plain) and a == b)


_LAYERS_BUILT: dict[tuple[int, ...], int] = {}  # EP group (global ranks) -> layers built on it


def _next_layer_index(group: EPGroup) -> int:
    key = tuple(dist.get_process_group_ranks(group.pg)) if group.distributed else ()
    index = _LAYERS_BUILT.get(key, 0)
    _LAYERS_BUILT[key] = index + 1
    return index
