"""`schedmoe train`: a small MoE language model trained with expert parallelism, end to end.

The model (`model.py`) has its MoE layers over the layout's EP group, dropless, with the
global-batch balance loss over the whole world; the global batch of a step depends on the step
alone (`data.py`) and each rank takes an equal share. So the run is the same training (up to
rounding) at any `--ranks` and `--ep-size`, and a run resumed from a checkpoint at another
layout continues the same curve. Checkpoints (`schedmoe.parallel` DCP, with the optimizer, the
RNG states and the loss history) go to DIR/step-NNNNNN every `checkpoint_every` steps and at the
end; each appears under that name only once complete (written aside, then renamed). `--resume`
takes the newest one that verifies (a damaged one is reported and the one before it tried),
after checking the run's settings against it and before reading any tensor; at the same layout
the resumed run is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ... import parallel
from ...comm.groups import serves_cuda
from ...errors import CheckpointError, ConfigError
from ..launch import planned_world, run_ranks_here
from ...registry import registry
from ...control.load import read_loads
from ...streams.lanes import lanes_for
from ...control.validation import number, one_of
from .data import CharCorpus, shard
from .model import MoELM, lm_loss

# What must not change when a run resumes (everything else may: layout, steps, schedule).
SAME_ON_RESUME = ("batch", "seq", "dim", "layers", "heads", "num_experts", "hidden_dim",
                  "top_k", "lr", "aux_weight", "clip", "seed")


@dataclass
class TrainConfig:
    steps: int = 200  # the total: a resumed run stops where the uninterrupted one does
    ep_size: int = 0  # 0: every rank (EP = world)
    batch: int = 16  # global batch, sequences
    seq: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    num_experts: int = 8
    hidden_dim: int = 128
    top_k: int = 2
    lr: float = 3e-3
    aux_weight: float = 0.01
    clip: float = 1.0
    seed: int = 0
    recipe: str = "ddp"  # "ddp" or "fsdp"
    scheduler: str = "sequential"
    a2a: str = "nccl"
    checkpoint_every: int = 50

    def validate(self, world: int) -> None:
        """Every setting (ConfigError or RegistryError naming it), before any rank starts."""
        where = "TrainConfig"
        for name in ("steps", "batch", "seq", "dim", "layers", "heads", "num_experts",
                     "hidden_dim", "top_k", "checkpoint_every"):
            number(where, name, getattr(self, name), integer=True, low=1, high=1 << 20)
        number(where, "ep_size", self.ep_size, integer=True, high=1 << 20)
        number(where, "seed", self.seed, integer=True, high=2 ** 31 - 1)
        number(where, "lr", self.lr, above=0, high=1e3)
        number(where, "aux_weight", self.aux_weight, high=1e6)
        number(where, "clip", self.clip, above=0)
        one_of(where, "recipe", self.recipe, ("ddp", "fsdp"))
        registry("scheduler").get(self.scheduler)
        registry("a2a").get(self.a2a)
        if self.dim % self.heads:
            raise ConfigError(f"{where}: dim ({self.dim}) must be divisible by heads "
                              f"({self.heads})")
        ep = self.ep_size or world
        if world % ep or self.num_experts % ep:
            raise ConfigError(f"{where}: ep_size ({ep}) must divide the ranks ({world}) and "
                              f"num_experts ({self.num_experts})")
        if self.batch % world:
            raise ConfigError(f"{where}: the global batch ({self.batch} sequences) must be "
                              f"divisible by the number of ranks ({world})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{where}: top_k ({self.top_k}) exceeds num_experts "
                              f"({self.num_experts})")


def train(cfg: TrainConfig, ranks: int | None = None, checkpoint_dir: str | None = None,
          resume: bool = False, progress: bool = True, timeout: float = 3600.0) -> dict:
    """Run the training on local ranks (or under torchrun); returns rank 0's record."""
    if resume and not checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir")
    cfg.validate(planned_world(ranks))
    per_rank = run_ranks_here(train_rank, (cfg, checkpoint_dir, resume, progress), ranks,
                              timeout=timeout)
    return per_rank[0]


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `directory` (those with a manifest), newest first."""
    found = [p for p in Path(directory).glob("step-*")
             if re.fullmatch(r"step-\d+", p.name) and (p / parallel.checkpoint.MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name[len("step-"):]), reverse=True)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step in `directory`, if any."""
    done = checkpoints(directory)
    return done[0] if done else None


def resume_from(directory: str | os.PathLike, wrapped, opt, layout,
                cfg: TrainConfig) -> tuple[Path, dict] | None:
    """Load the newest checkpoint of `directory` that verifies (a collective); its path and
    `extra`, or None if there is none. The settings are checked before any tensor is read;
    damaged checkpoints are reported on stderr and skipped, and if every one is damaged,
    CheckpointError says why."""
    problems = []
    for path in checkpoints(directory):
        try:  # the manifest first (settings that differ raise ConfigError), then the tensors
            _check_resumable(parallel.read_manifest(path)["extra"].get("config"), cfg, path)
            return path, parallel.load_checkpoint(path, wrapped, opt, layout)
        except CheckpointError as exc:  # the same on every rank: try the one before
            problems.append(f"{path.name}: {exc}")
            if dist.get_rank() == 0:
                print(f"schedmoe train: skipping {path}: {exc}", file=sys.stderr)
    if problems:
        raise CheckpointError("no checkpoint to resume from verifies: " + "; ".join(problems))
    return None


def train_rank(rank: int, world: int, cfg: TrainConfig, checkpoint_dir: str | None,
               resume: bool, progress: bool) -> dict:
    cfg.validate(world)
    layout = parallel.init_parallel(cfg.ep_size or world)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if serves_cuda(dist.group.WORLD) else torch.device("cpu")
    data = CharCorpus()
    torch.manual_seed(cfg.seed)
    model = MoELM(len(data.vocab), dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, seq=cfg.seq,
                  hidden_dim=cfg.hidden_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                  capacity_factor=0, balance_loss="global", scheduler=cfg.scheduler, a2a=cfg.a2a,
                  group=layout.ep_group, balance_group=layout.dp_group).to(device)
    if cfg.recipe == "ddp":
        on_gpu = {"device_ids": [device.index]} if device.type == "cuda" else {}
        wrapped = parallel.data_parallel(model, layout, **on_gpu)
    else:
        wrapped = parallel.fully_shard_moe(model, layout)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr)
    layers = parallel.moe_layers(model)
    history: list[dict] = []
    start, resumed_from = 0, None
    if resume:
        found = resume_from(checkpoint_dir, wrapped, opt, layout, cfg)
        if found is not None:
            path, extra = found
            start, history, resumed_from = extra["step"], extra["history"], str(path)
    bar = _progress_bar(cfg.steps, start) if progress and rank == 0 else None
    loads: list = []  # the experts' load at the last step (control/load.py)
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        inputs_BS, targets_BS = (shard(t, rank, world).to(device)
                                 for t in data.batch(step, cfg.batch, cfg.seq, cfg.seed))
        loss, ce, aux = lm_loss(wrapped, inputs_BS, targets_BS, cfg.aux_weight)
        opt.zero_grad()
        loss.backward()
        parallel.clip_grad_norm_(wrapped, cfg.clip, layout)
        opt.step()
        dropped = sum(layer.last_stats.dropped_E.sum() for layer in layers)
        # Logging: one all-reduce and one host sync per step. The experts' load (a moving
        # average per layer, control/load.py) summed over every rank is the whole load.
        lanes = lanes_for(device)  # the load's average is updated on its stats lane
        stats = torch.cat([torch.stack([ce.detach().float(), aux.detach().float(),
                                        dropped.float()]),
                           *[layer.load.read(lanes).reshape(-1) for layer in layers]])
        dist.all_reduce(stats)
        values = stats.tolist()
        loads = read_loads(values[3:], layers)
        seconds = time.perf_counter() - began
        history.append({"step": step + 1, "loss": values[0] / world,
                        "aux": values[1] / world, "dropped": int(values[2]),
                        "balancedness": [round(load.balancedness, 4) for load in loads],
                        "tokens_per_s": cfg.batch * cfg.seq / seconds})
        if bar is not None:
            last = history[-1]
            bar.set_postfix(loss=f"{last['loss']:.4f}", aux=f"{last['aux']:.3f}",
                            tok_s=f"{last['tokens_per_s']:.0f}", dropped=last["dropped"],
                            balance=f"{min(last['balancedness']):.2f}")
            bar.update(1)
        if checkpoint_dir and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            parallel.save_checkpoint(Path(checkpoint_dir) / f"step-{step + 1:06d}", wrapped, opt,
                                     layout, extra={"step": step + 1, "history": history,
                                                    "config": asdict(cfg)})
    if bar is not None:
        bar.close()
    return {"config": asdict(cfg), "world": world, "layout": layout.describe(),
            "backend": dist.get_backend(), "resumed_from": resumed_from, "history": history,
            "load": {name: load.as_dict() for (name, _), load in
                     zip(parallel.named_moe_layers(model), loads)}}



def _check_resumable(saved: dict | None, cfg: TrainConfig, path: Path) -> None:
    if not isinstance(saved, dict) or any(k not in saved for k in SAME_ON_RESUME):
        raise CheckpointError(f"{path} was not saved by schedmoe train: its manifest has no "
                              "run settings")
    changed = {k: (saved[k], getattr(cfg, k)) for k in SAME_ON_RESUME
               if saved[k] != getattr(cfg, k)}
    if changed:
        raise ConfigError("the checkpoint was trained with other settings; resume with the same "
                          + ", ".join(f"--{k.replace('_', '-')} {old} (not {new})"
                                      for k, (old, new) in changed.items()))


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="schedmoe train", unit="step")


def save_curve(record: dict, path: str, label: str = "loss",
               others: dict[str, dict] | None = None) -> None:
    """The loss curve (and any `others`, by label, dashed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rec) in enumerate({label: record, **(others or {})}.items()):
        steps = [h["step"] for h in rec["history"]]
        ax.plot(steps, [h["loss"] for h in rec["history"]], label=name, linewidth=1.2,
                linestyle="-" if i == 0 else "--")
    cfg = record["config"]
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (global batch)")
    ax.set_title(f"schedmoe train: {record['layout']}, {cfg['num_experts']} experts, "
                 f"top-{cfg['top_k']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
