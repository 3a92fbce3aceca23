"""`MoELayer`: a drop-in mixture-of-experts block with expert parallelism.

Legend: T tokens on this rank, M model dim, E experts (global), W ranks in the EP group,
n = E / W local experts, C capacity (slots per expert), K top-k; P the payload in the call's
layout (`[W, n, C, M]` padded, `[N, M]` ragged rows, plan/layout.py).

One call reads as the data path, one call into its own module per step:
route (routing/route.py) -> agree (control/agreement.py: every rank swaps one small record, so
that a bad input, a local failure or a mismatched option on any rank raises on every rank;
once calls repeat at a fixed capacity the record rides on the first dispatch) -> plan and
encode (plan/) -> schedule (schedulers/: compress -> A2A -> decompress -> experts -> compress ->
A2A -> decompress, overlapped in chunks) -> decode (plan/) -> losses and stats.

Options may change between calls, on every rank alike: `layer.scheduler = ...`,
`layer.codecs = ...`, `layer.a2a = ...`, `layer.config.capacity_factor = ...` (or any other
field but those in FIXED_OPTIONS, which shape the parameters). The layer re-reads them at its
next call (rebuilding the scheduler, codecs or A2A if their config field changed) and the
agreement checks them there: a change on one rank only raises ConfigMismatchError on every rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .a2a_algos.base import A2AAlgorithm
from .comm.groups import EPGroup, collective_device
from .control import compiled
from .control.agreement import (FAILED, OK, Agreed, Agreement, LocalStep, Rider,
                                check_input)
from .control.options import (FIXED_OPTIONS, MoEConfig, build_a2a, build_codecs,
                              build_scheduler, canonical, next_layer_index, same, sources)
from .control.load import ExpertLoad
from .control.recorder import StepRecorder
from .control.rider import ride_costs_no_sync
from .control.stats import LayerStats
from .errors import ConfigError
from .exchange import events
from .ops.codecs import checks
from .ops.codecs.codec_set import CodecSet
from .ops.experts import mark_expert_parameters
from .ops.experts.ranges import load_expert_range, save_expert_range
from .ops.experts.shared import SharedExperts
from .ops.experts.replicas import fill_slots, move_slots, sum_replica_grads
from .plan.layout import layout_for
from .plan.placement import (EMPTY, Placement, PhysicalPairs, initial_placement,
                             static_placement)
from .plan.plans import DispatchPlan
from .registry import registry
from .routing.balance import balance_loss
from .routing.route import Routed, route
from .schedulers.base import Scheduler, SharedWork, StepContext
from .streams.lanes import lanes_for


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
        expert_seed = int(torch.randint(0, 2 ** 62, (), device="cpu")) + self.expert_offset
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        expert_cls = registry("expert").resolve(cfg.expert)
        expert_args = dict(cfg.expert_options)
        if cfg.activation is not None:
            expert_args["activation"] = cfg.activation
        # Physical expert slots a rank (plan/placement.py): its E / W experts, plus replica
        # slots for hot experts, filled from the experts' owners (a collective).
        self.slots = self.num_local_experts + cfg.redundant_slots
        self.placement = initial_placement(cfg.num_experts, self.group.size,
                                           cfg.redundant_slots)
        self._static = static_placement(cfg.num_experts, self.group.size)
        self._physical: dict[torch.device, PhysicalPairs] = {}
        with torch.random.fork_rng(devices=gpus):  # every RNG the experts may draw from
            torch.manual_seed(expert_seed)
            self.experts = expert_cls(self.num_local_experts, model_dim, hidden_dim,
                                      **expert_args)
            if cfg.redundant_slots:
                own, self.experts = self.experts, expert_cls(self.slots, model_dim,
                                                             hidden_dim, **expert_args)
        if cfg.redundant_slots:
            fill_slots(self.experts, own, self.placement.slots, self.group)
        mark_expert_parameters(self.experts)
        # Shared experts are replicated like the gate: drawn from the global RNG. n experts of
        # hidden size H are one MLP of n * H (their hidden units side by side, outputs summed).
        shared_dim = cfg.num_shared_experts * cfg.shared_hidden_dim
        self.shared = SharedExperts(expert_cls(1, model_dim, shared_dim, **expert_args),
                                    cfg.shared_gate) if shared_dim else None
        self.a2a = build_a2a(cfg, self.group)
        self.codecs = build_codecs(cfg)
        self.scheduler = build_scheduler(cfg.scheduler)
        # The config values the live scheduler, codecs and A2A were built from: a new value
        # rebuilds them at the next call (_refresh).
        self._built_from = sources(cfg)
        # Which layer this is: its place in the order in which this EP group's layers were
        # built, the same on every rank that builds the model alike. It is in the per-call
        # record, so a call that pairs different layers across ranks raises ConfigMismatchError.
        self.layer_index = next_layer_index(self.group)
        options = self._options()
        self._fixed = {name: options[name] for name in FIXED_OPTIONS}
        self._agreement = Agreement(self.group, options, self.group.size * self.slots)
        # A compiled call on several ranks checks its record through a custom op.
        self._compile_key = compiled.register(self._agreement) if self.group.distributed \
            else None
        self._changes = 0  # assignments of scheduler, codecs, a2a or config (__setattr__)
        self._options_key = self._key()  # what the options were last read from
        self._ran_key = self._call_key = self._options_key  # the options at the last call
        # Ragged rows (no padding) unless asked to pad: the split sizes ride in the per-call
        # agreement (dropless swaps them anyway). Fixed capacity with error feedback keeps the
        # padded layout, whose residuals belong to fixed slots.
        self.ragged = self._wants_ragged()

        # (aux loss, stats) of the last call: under None that of any caller, under i that of
        # micro-batch i of an interleaved step (exchange/events.py), which calls in turns.
        self._last: dict[int | None, tuple[torch.Tensor | None, LayerStats | None]] = {}
        # Pairs per expert over a window of calls (control/load.py; read by parallel.expert_load)
        self.load = ExpertLoad()
        # Serving calls (`serve`): this rank has no work left and keeps the others going.
        self._serving, self.all_idle = False, False
        # Which experts this rank's state dict holds (ops/experts/ranges.py).
        self.register_state_dict_post_hook(save_expert_range)
        self.register_load_state_dict_pre_hook(load_expert_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # Inside a backward pass, a forward is an activation checkpoint's recompute: it must
        # repeat the decisions of the forward it recomputes, and leaves the stats alone.
        compiling = torch.compiler.is_compiling()  # the host-side bookkeeping stays out
        recompute = not compiling and torch._C._current_graph_task_id() != -1
        # Inference (inference_mode, or no_grad in eval mode; not a reentrant activation
        # checkpoint's no_grad forward, which is in training mode): no aux losses, no timing,
        # no tuning: the agreement and the exchanges only.
        quiet = not compiling and (torch.is_inference_mode_enabled() or (
            not torch.is_grad_enabled() and not self.training))
        device = next(self.parameters()).device
        fresh = [StepRecorder(device, trace=cfg.trace, timing=not quiet)]  # a retry's: afresh

        def new_timer() -> StepRecorder:
            return fresh.pop() if fresh else StepRecorder(device, cfg.trace, timing=not quiet)

        route_timer = fresh[0]
        if cfg.input_jitter and self.training and isinstance(x, torch.Tensor):
            x = x * torch.empty_like(x).uniform_(1 - cfg.input_jitter, 1 + cfg.input_jitter)
        local, routed = self._route(x, device, route_timer)
        local.quiet = quiet  # agreed: a training call's global balance loss all-reduces

        def send(agreed: Agreed, rider: Rider | None, running: tuple | None,
                 timer: StepRecorder) -> tuple:
            return self._exchange(x, local, routed, agreed, timer, recompute, rider, running,
                                  quiet=quiet)

        if compiling and self._traces_whole(local):
            # One graph on several ranks: the record checked by a custom op, the exchanges as
            # functional collectives (control/compiled.py, exchange/send.py).
            agreed, zero = compiled.agree(self._agreement, self._compile_key, local, device)
            timer = new_timer()
            plan, layout, y_P, ctx = self._exchange(x, local, routed, agreed, timer, recompute,
                                                    None, None, after=zero)
        else:
            run = self._agreement.run
            if compiling and (self.ragged or self.group.distributed
                              or not type(self.scheduler).traceable):
                # Driven from the host (split sizes, collectives, a tuner's clocks): eager,
                # between the compiled routing and the compiled decode.
                run = torch.compiler.disable(run)
            agreed, (plan, layout, y_P, ctx), timer = run(
                # (no riding under compile: the other ranks may all-gather in the op above)
                local, send, new_timer, ride=self._can_guess() and not compiling,
                objects=self._live(),
                moved=self._call_key != self._ran_key, may_ride=self._may_ride(),
                observe=self._observe if self.codecs.uses_feedback else None)
            self._ran_key = self._call_key
        if plan is None:
            raise AssertionError("a rank that sent a placeholder passed the agreement")
        self.all_idle = agreed.all_idle

        num_tokens = plan.kept_TK.shape[0]
        with timer("decode"):
            y_TM = layout.decode(y_P, plan, num_tokens)
        if ctx.shared is not None:  # run now unless the scheduler ran it during its exchanges
            y_TM = y_TM + ctx.shared.result(timer, ctx.lanes)
        routing = routed.routing
        balance = routing.balance_loss
        if quiet:  # nothing to train: no loss (a "global" one would all-reduce every call)
            aux = torch.zeros((), device=y_TM.device)
        else:
            if balance is None:
                sequences = x.shape[0] if x.dim() == 3 else 1
                balance = balance_loss(cfg.balance_loss, routing.probs_TE, routing.expert_TK,
                                       sequences, self.balance_group)
            aux = balance + cfg.z_loss_weight * routing.z_loss
        if not recompute:
            counts_E, dropped_E = plan.counts_E, plan.dropped_E
            if routed.logical_counts_E is not None:  # replica slots: the logical experts'
                counts_E = routed.logical_counts_E
                dropped_E = counts_E - counts_E.clamp(max=local.limit)
            stats = LayerStats(num_tokens, agreed.capacity, local.limit, counts_E, dropped_E,
                               plan.kept_TK, ctx.notes, timer)
            self._last[None] = self._last[events.caller()] = (aux, stats)
            if not compiling:  # host state stays out of a compiled graph
                self.load.observe(counts_E, dropped_E, ctx.lanes)
        y = y_TM.view(x.shape)
        y.l_aux = aux  # Tutel's convention
        return y

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last call's aux loss; inside an interleaved step, the calling micro-batch's."""
        return self._last.get(events.caller(), (None, None))[0]

    @property
    def last_stats(self) -> LayerStats | None:
        """What the last call did on this rank; inside an interleaved step, the calling
        micro-batch's last call. Raises the `CorruptPayloadError` of a payload found corrupt
        since the last call, if any (waiting for the device's checks)."""
        checks.raise_failure(wait=True)
        return self._last.get(events.caller(), (None, None))[1]

    def runtime_state(self) -> dict:
        """What this rank's layer carries from call to call beyond its state dict: the
        scheduler's tuning, error-feedback residuals, the router's choice counts since its last
        balancing update, the expert load's moving average. Checkpoints keep it per rank and
        restore it at the same layout."""
        counts = {name: buffer.clone() for name, buffer in self.gate.named_buffers(recurse=False)
                  if name in self.gate._non_persistent_buffers_set}
        load = self.load.read(lanes_for(next(self.parameters()).device))
        return {"scheduler": self.scheduler.runtime_state(),
                "codecs": self.codecs.runtime_state(), "gate": counts,
                "load": {"average": None if load is None else load.clone(),
                         "calls": self.load.calls}}

    def load_runtime_state(self, state: dict) -> None:
        """Continue from `runtime_state()` of a layer built alike on the same rank."""
        self.scheduler.load_runtime_state(state.get("scheduler", {}))
        self.codecs.load_runtime_state(state.get("codecs", {}))
        if "load" in state:
            average = state["load"]["average"]
            self.load.average_2E = None if average is None else average.clone().to(
                next(self.parameters()).device)
            self.load.calls = state["load"]["calls"]
        with torch.no_grad():
            for name, value in state.get("gate", {}).items():
                getattr(self.gate, name).copy_(value)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("scheduler", "codecs", "a2a", "config") and "_changes" in self.__dict__:
            self._changes += 1  # re-read at the next call

    @property
    def _guess(self) -> Agreed | None:
        return self._agreement.guess

    def _can_guess(self) -> bool:
        """Whether the next call's record rides on its first dispatch (control/agreement.py):
        decided at the end of the last call, from what every rank agreed."""
        return self._agreement.guess is not None

    def _may_ride(self) -> bool:
        """Whether this layer's options let records ride: fixed capacity in padded rows, no
        error feedback, a scheduler that carries it, more than one rank; and a ride that
        costs the device no more than the all-gather would (control/rider.py)."""
        return (self.config.capacity_factor > 0 and not self.ragged
                and not self.codecs.uses_feedback and self.group.distributed
                and type(self.scheduler).carries_agreement
                and ride_costs_no_sync(next(self.parameters()).device.type,
                                       collective_device(self.group.pg).type))

    def _options(self) -> dict[str, str]:
        options = self.config.canonical(self.codecs, self.scheduler, self.a2a)
        options["layer"] = f"MoE layer #{self.layer_index} built on this EP group"
        options["placement"] = repr(self.placement.slots)
        return options

    @torch.no_grad()
    def serve(self, dtype: torch.dtype | None = None) -> bool:
        """A call without tokens, marked idle in the agreement record: a rank with no work left
        makes it so that the ranks still working can exchange (a collective, like any call;
        the input dtype must be theirs: by default the gate's). Returns whether every rank of
        the EP group made a serving call too: then all are done (hf/generate.py)."""
        weight = self.gate.wg_EM
        x = torch.zeros(0, self.config.model_dim, dtype=dtype or weight.dtype,
                        device=weight.device)
        self._serving = True
        try:
            self(x)
        finally:
            self._serving = False
        return self.all_idle

    # -- placement (plan/placement.py, ops/experts/replicas.py) ------------------------------

    def place(self, placement: Placement, optimizer: torch.optim.Optimizer | None = None
              ) -> None:
        """Move the experts to `placement` (the same slots a rank): the weights and the
        optimizer's state shaped like them (AdamW's moments), one all-gather per tensor. A
        collective: every rank of the EP group calls it, with the same placement, between
        steps."""
        p, num_experts = placement, self.config.num_experts
        if (not isinstance(p, Placement) or p.ranks != self.group.size
                or p.num_experts != num_experts
                or any(len(row) != self.slots or _twice(row)
                       or not all(isinstance(e, int) and EMPTY <= e < num_experts for e in row)
                       for row in p.slots)
                or (p.replicas() == 0).any()):
            raise ConfigError(f"a placement for this layer holds every one of its "
                              f"{self.config.num_experts} experts in {self.group.size} ranks x "
                              f"{self.slots} slots ({EMPTY}: empty), none twice on a rank; "
                              f"got {p!r}")
        if any(isinstance(t, DTensor) for t in self.experts.parameters()):
            raise ConfigError("the experts are sharded by FSDP2 (fully_shard_moe), which cannot "
                              "place them; use the DDP recipe (data_parallel) with placements "
                              "and replica slots")
        move_slots(self.experts, self.placement.slots, p.slots, self.config.num_experts,
                   self.group, optimizer)
        self.placement, self._physical = p, {}
        self._changes += 1  # the ranks agree on the new placement at the next call

    @property
    def placed(self) -> bool:
        """Whether the experts sit elsewhere than the static E / W a rank (replica slots, or
        a planned placement): calls then map pairs onto physical slots."""
        return self.config.redundant_slots > 0 or self.placement != self._static

    def sync_replica_grads(self) -> None:
        """Sum each expert's gradient over its replicas (after the backward passes, before the
        optimizer step; a collective). Nothing to do without replica slots."""
        if self.config.redundant_slots:  # (a placement without replicas has nothing to sum)
            sum_replica_grads(self.experts, self.placement.slots, self.config.num_experts,
                              self.group)

    def _to_physical(self, routed: Routed) -> Routed:
        """The call's pairs on the placement's physical slots (PhysicalPairs)."""
        device = routed.slot_TK.device
        if device not in self._physical:
            self._physical[device] = PhysicalPairs(self.placement, device)
        physical = self._physical[device]
        expert_TK, slot_TK, counts_P = physical.pairs(routed.routing.expert_TK, routed.slot_TK,
                                                      routed.limit)
        counts = None if routed.counts is None else physical.counts(routed.counts, routed.limit)
        return dataclasses.replace(routed, expert_TK=expert_TK, slot_TK=slot_TK,
                                   counts_E=counts_P, counts=counts,
                                   logical_counts_E=routed.counts_E)

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

    def _observe(self, agreed: Agreed) -> None:
        """Error feedback drops its residuals when the agreed slot layout changed."""
        self.codecs.observe_layout((agreed.capacity, agreed.layouts))

    def _refresh(self) -> None:
        """Re-read the options if one changed since the last call: rebuild the scheduler,
        codecs or A2A whose config field changed, put the new options in the agreement (which
        compares them across the ranks at this call) and refuse changes to FIXED_OPTIONS."""
        self._call_key = self._key()
        if self._call_key == self._options_key:
            return
        cfg = self.config
        built, now = self._built_from, sources(cfg)
        if not same(now["scheduler"], built["scheduler"]):
            self.scheduler = build_scheduler(cfg.scheduler)
        if not same(now["codecs"], built["codecs"]):
            self.codecs = build_codecs(cfg)
        if not same(now["a2a"], built["a2a"]):
            self.a2a = build_a2a(cfg, self.group)
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

    def _traces_whole(self, local: LocalStep) -> bool:
        """Whether a compiled call on several ranks is one graph: padded rows at a fixed
        capacity, a traceable scheduler and A2A, stateless fixed-size codecs, no problem."""
        return (self.group.distributed and local.problem == OK and not self.ragged
                and self.config.capacity_factor > 0 and type(self.scheduler).traceable
                and type(self.a2a).traceable and self.codecs.traceable)

    def _exchange(self, x: torch.Tensor, local: LocalStep, routed: Routed | None,
                  agreed: Agreed, timer: StepRecorder, recompute: bool, rider: Rider | None,
                  running: tuple | None, after: torch.Tensor | None = None,
                  quiet: bool = False) -> tuple:
        """Plan and encode at the agreed (or guessed) capacity in the call's layout and run the
        scheduler: (plan, layout, y_P, ctx). A rank whose own state does not fit a guess sends
        zeros of the guessed shape: the rider's check then raises on every rank before
        anything is decoded. `running`: the (scheduler, codecs, A2A) to send through, if not
        the live ones; `after`: a zero the payload adds, so that it comes after the op that
        made it (a compiled call's agreement)."""
        cfg = self.config
        scheduler, codecs, a2a = running or self._live()
        layout = layout_for(agreed.capacity, self.group.size, self.slots,
                            local.counts, agreed.counts_WE, self.group.rank * self.slots)
        fits = (local.problem == OK and local.limit <= agreed.capacity
                and local.dtype == agreed.dtype and local.input_grad <= agreed.input_grad)
        plan: DispatchPlan | None = None
        if fits:
            routing = routed.routing
            with timer("encode"):
                experts_TK = routing.expert_TK if routed.expert_TK is None else routed.expert_TK
                plan = layout.plan(experts_TK, routing.weight_TK, routed.slot_TK,
                                   routed.counts_E, local.limit)
                x_P = layout.encode(x.reshape(-1, cfg.model_dim), plan)
            if after is not None:
                x_P = x_P + after.to(x_P.dtype)
        elif rider is not None:
            x_P = layout.placeholder(cfg.model_dim, getattr(torch, agreed.dtype),
                                     next(self.parameters()).device)
        else:
            raise AssertionError("the agreement passed a call that does not fit it")
        if local.graph and agreed.input_grad and not x_P.requires_grad:
            # Another rank's input needs a gradient, so its dispatch is differentiated and the
            # backward exchange runs there: take part in it (the gradient here goes nowhere).
            x_P = x_P.detach().requires_grad_()
        shared = None if self.shared is None or not fits else \
            SharedWork(self.shared, x.reshape(-1, cfg.model_dim))
        ctx = StepContext(self.experts, a2a, codecs, timer, layout, recompute=recompute,
                          rider=rider, shared=shared, lanes=lanes_for(x_P.device), quiet=quiet)
        y_P = scheduler.run(x_P, ctx)
        if rider is not None and not rider.arrived:
            raise ConfigError(f"{scheduler.describe()} sets carries_agreement but sent no "
                              "dispatch through ctx.dispatch or ctx.start_dispatch")
        return plan, layout, y_P, ctx

    def _route(self, x: torch.Tensor, device: torch.device,
               timer: StepRecorder) -> tuple[LocalStep, Routed | None]:
        """This rank's input checks, re-read options and routing. Nothing raises here: a
        problem or a failure is recorded for the agreement, which raises it on every rank."""
        cfg = self.config
        local = check_input(x, device, cfg.model_dim, self.experts, cfg.check_finite,
                            cfg.allow_empty or self._serving)
        local.idle = self._serving
        try:
            self._refresh()
            # A payload found corrupt on the device since the last call (ops/codecs/checks.py):
            # reported now, through the agreement, so that every rank raises it (a compiled
            # call leaves it to the next eager call or to `last_stats`).
            if not torch.compiler.is_compiling():
                checks.raise_failure()
        except Exception as exc:  # raised on every rank by the agreement
            if local.problem == OK:
                local.problem, local.error = FAILED, exc
        if self.ragged:
            local.counts = [0] * (self.group.size * self.slots)
        if local.problem != OK:
            return local, None
        try:
            with timer("route"):
                routed = route(self.gate, x.reshape(-1, cfg.model_dim),
                               num_experts=cfg.num_experts, top_k=cfg.top_k,
                               capacity_factor=cfg.capacity_factor,
                               drop_policy=cfg.drop_policy, ragged=self.ragged,
                               feedback=self.codecs.uses_feedback)
        except Exception as exc:  # reported to every rank by the agreement, raised there
            local.problem, local.error = FAILED, exc
            return local, None
        if self.placed:
            routed = self._to_physical(routed)
        local.limit, local.layout, local.counts = routed.limit, routed.layout, routed.counts
        return local, routed

    def extra_repr(self) -> str:
        c = self.config
        return (f"model_dim={c.model_dim}, num_experts={c.num_experts} "
                f"({self.num_local_experts} local), hidden_dim={c.hidden_dim}, top_k={c.top_k}, "
                f"capacity_factor={c.capacity_factor}, a2a={canonical(type(self.a2a), 'a2a')}, "
                f"compressor={self.codecs.describe()}, scheduler={self.scheduler.describe()}")


def _twice(row: tuple[int, ...]) -> bool:
    """Whether a rank's slots hold an expert twice (empty slots aside)."""
    held = [e for e in row if e != EMPTY]
    return len(set(held)) != len(held)
