"""Expert networks: a batch of independent FFNs applied to `[E, C, M]` with batched GEMMs.

Legend: E local experts, C tokens per expert (capacity, all source ranks), M model dim,
H hidden dim.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...comm.host import to_device
from ...errors import ConfigError
from ...registry import register_expert

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def resolve_activation(activation: str | Callable[[torch.Tensor], torch.Tensor]):
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)} "
                          "or pass a callable")
    return ACTIVATIONS[activation]


def activation_name(activation: str | Callable | None) -> str | Callable | None:
    """The registered name of a built-in activation function ("gelu" for F.gelu), else as is."""
    for name, fn in ACTIVATIONS.items():
        if activation is fn:
            return name
    return activation


def mark_expert_parameters(module: nn.Module) -> None:
    """Tag parameters as expert-parallel so data-parallel all-reduce can skip them.

    Sets `param.expert = True` (schedmoe) and `param.allreduce = False` (DeepSpeed's convention).
    """
    for p in module.parameters():
        p.expert = True
        p.allreduce = False


def is_expert_parameter(p: torch.Tensor) -> bool:
    return bool(getattr(p, "expert", False))


class Expert(nn.Module):
    """Base class of expert modules: `forward(x_ECM) -> y_ECM` for `num_experts` local experts.

    Subclasses keep this constructor signature so the layer can build any registered expert.
    """

    def __init__(self, num_experts: int, model_dim: int, hidden_dim: int,
                 activation: str | Callable = "gelu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.model_dim = model_dim
        self.hidden_dim = hidden_dim
        self.activation = resolve_activation(activation)

    def forward_ragged(self, x_RM: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts on rows grouped by expert (`counts[e]` rows for expert e, in order), for
        dispatch without padding (`ragged`). A form that defines `form(x, linear)` runs as one
        `torch._grouped_mm` per GEMM where the build and the shapes allow it (16-byte aligned
        rows; on our CPUs even with the per-expert path, experiments/ragged_bench.py), else as
        2-D GEMMs per expert (~7% faster than `bmm` over a padded buffer, shared/REFERENCE.md);
        any other form gets its rows padded to the largest local group and `forward`."""
        form = getattr(self, "form", None)
        if form is None:
            pieces = torch.split(x_RM, counts)
            widest = max(counts, default=0)
            padded_ECM = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, widest - p.shape[0]))
                                      for p in pieces])
            y_ECM = self(padded_ECM)
            return torch.cat([y_ECM[e, :n] for e, n in enumerate(counts)])
        if self._grouped_mm_fits(x_RM):
            counts_E = to_device(counts, x_RM.device)
            offs_E = to_device(list(itertools.accumulate(counts)), x_RM.device, torch.int32)

            def grouped(x, w_EIO, b_EO):
                y = torch._grouped_mm(x, w_EIO, offs=offs_E)
                return y if b_EO is None else y + b_EO.repeat_interleave(
                    counts_E, dim=0, output_size=x.shape[0])
            return form(x_RM, grouped)
        outs = [form(piece, _one_expert(e)) for e, piece in enumerate(torch.split(x_RM, counts))
                if piece.shape[0]]
        if outs:
            return torch.cat(outs)
        # No rows here, some elsewhere: the output must still hang off the input and the
        # parameters, so that autograd runs this rank's side of the backward exchanges like
        # every other rank's (inside the module's call, where FSDP has the parameters whole).
        return x_RM[:, :self.model_dim] * 0 + sum(p.reshape(-1)[:1].sum() * 0
                                                  for p in self.parameters())

    def _grouped_mm_fits(self, x_RM: torch.Tensor) -> bool:
        """torch._grouped_mm needs fp32/bf16/fp16 (bf16 when compiled) and rows of a multiple of
        16 bytes."""
        if not hasattr(torch, "_grouped_mm") or x_RM.dtype not in (
                torch.float32, torch.bfloat16, torch.float16):
            return False
        if torch.compiler.is_compiling() and x_RM.dtype != torch.bfloat16:
            return False  # its meta kernel, which tracing runs, takes bf16 only (torch 2.13)
        size = x_RM.element_size()
        dims = [x_RM.shape[1]] + [d for p in self.parameters() if p.dim() == 3
                                  for d in p.shape[1:]]
        return all(d * size % 16 == 0 for d in dims)


def _one_expert(e: int) -> Callable:
    """`linear(x, w, b)` with expert e's weights, as a 2-D GEMM."""
    def linear(x, w_EIO, b_EO):
        return x @ w_EIO[e] if b_EO is None else torch.addmm(b_EO[e], x, w_EIO[e])
    return linear


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


@register_expert("ffn")
class FFNExpert(Expert):
    """y = act(x @ w1 + b1) @ w2 + b2, per expert, as two batched GEMMs."""

    def __init__(self, num_experts: int, model_dim: int, hidden_dim: int,
                 activation: str | Callable = "gelu") -> None:
        super().__init__(num_experts, model_dim, hidden_dim, activation)
        self.w1_EMH = _uniform(num_experts, model_dim, hidden_dim, fan_in=model_dim)
        self.b1_EH = _uniform(num_experts, hidden_dim, fan_in=model_dim)
        self.w2_EHM = _uniform(num_experts, hidden_dim, model_dim, fan_in=hidden_dim)
        self.b2_EM = _uniform(num_experts, model_dim, fan_in=hidden_dim)

    def forward(self, x_ECM: torch.Tensor) -> torch.Tensor:
        return self.form(x_ECM, _linear)

    def form(self, x: torch.Tensor, linear: Callable) -> torch.Tensor:
        """The form, with `linear(x, w, b)` over every expert (batched), one, or grouped."""
        return linear(self.activation(linear(x, self.w1_EMH, self.b1_EH)), self.w2_EHM,
                      self.b2_EM)


@register_expert("swiglu")
class SwiGLUExpert(Expert):
    """y = (act(x @ w1 + b1) * (x @ w3 + b3)) @ w2 + b2 per expert (Mixtral, Qwen-MoE, OLMoE,
    DeepSeek-V3 without biases). w1 is the gate projection, w3 the up projection: stored apart
    (`w1_EMH`, `w3_EMH`), or with `fused=True` in one `w13_EM2H` so that both take one GEMM:
    gate columns first (transformers' Mixtral-style `gate_up_proj`, transposed), or with
    `interleaved=True` alternating gate, up, gate, ... (GPT-OSS's `gate_up_proj` as is). The
    activation defaults to silu; `bias=True` adds b1, b3 (or b13) and b2."""

    def __init__(self, num_experts: int, model_dim: int, hidden_dim: int,
                 activation: str | Callable = "silu", bias: bool = False,
                 fused: bool = False, interleaved: bool = False) -> None:
        super().__init__(num_experts, model_dim, hidden_dim, activation)
        if interleaved and not fused:
            raise ConfigError("interleaved gate/up storage needs fused=True")
        self.fused, self.interleaved = fused, interleaved
        if fused:
            self.w13_EM2H = _uniform(num_experts, model_dim, 2 * hidden_dim, fan_in=model_dim)
            self.b13_E2H = _uniform(num_experts, 2 * hidden_dim, fan_in=model_dim) \
                if bias else None
        else:
            self.w1_EMH = _uniform(num_experts, model_dim, hidden_dim, fan_in=model_dim)
            self.w3_EMH = _uniform(num_experts, model_dim, hidden_dim, fan_in=model_dim)
            self.b1_EH = _uniform(num_experts, hidden_dim, fan_in=model_dim) if bias else None
            self.b3_EH = _uniform(num_experts, hidden_dim, fan_in=model_dim) if bias else None
        self.w2_EHM = _uniform(num_experts, hidden_dim, model_dim, fan_in=hidden_dim)
        self.b2_EM = _uniform(num_experts, model_dim, fan_in=hidden_dim) if bias else None

    def forward(self, x_ECM: torch.Tensor) -> torch.Tensor:
        return self.form(x_ECM, _linear)

    def form(self, x: torch.Tensor, linear: Callable) -> torch.Tensor:
        """The form, with `linear(x, w, b)` over every expert (batched), one, or grouped."""
        if self.fused:
            both = linear(x, self.w13_EM2H, self.b13_E2H)
            gate, up = (both[..., ::2], both[..., 1::2]) if self.interleaved else \
                both.chunk(2, dim=-1)
        else:
            gate, up = linear(x, self.w1_EMH, self.b1_EH), linear(x, self.w3_EMH, self.b3_EH)
        return linear(self.glu(gate, up), self.w2_EHM, self.b2_EM)

    def glu(self, gate_ECH: torch.Tensor, up_ECH: torch.Tensor) -> torch.Tensor:
        return self.activation(gate_ECH) * up_ECH


@register_expert("clamped_glu")
class ClampedGLUExpert(SwiGLUExpert):
    """GPT-OSS's expert: gate = (x @ w1 + b1).clamp(max=limit), up = (x @ w3 + b3).clamp(-limit,
    limit), h = gate * sigmoid(alpha * gate) * (up + 1), y = h @ w2 + b2. Biases on by default;
    GPT-OSS's storage is `fused=True, interleaved=True`."""

    def __init__(self, num_experts: int, model_dim: int, hidden_dim: int,
                 activation: str | Callable = "silu", bias: bool = True, alpha: float = 1.702,
                 limit: float = 7.0, fused: bool = False, interleaved: bool = False) -> None:
        super().__init__(num_experts, model_dim, hidden_dim, activation, bias, fused,
                         interleaved)
        self.alpha, self.limit = alpha, limit

    def glu(self, gate_ECH: torch.Tensor, up_ECH: torch.Tensor) -> torch.Tensor:
        gate_ECH = gate_ECH.clamp(max=self.limit)
        up_ECH = up_ECH.clamp(-self.limit, self.limit)
        return gate_ECH * torch.sigmoid(self.alpha * gate_ECH) * (up_ECH + 1)


def _linear(x_ECI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None) -> torch.Tensor:
    """x @ w (+ b) per expert, as one batched GEMM."""
    if b_EO is None:
        return torch.bmm(x_ECI, w_EIO)
    return torch.baddbmm(b_EO.unsqueeze(1), x_ECI, w_EIO)
