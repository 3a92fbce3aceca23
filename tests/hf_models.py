"""Tiny random transformers models of the six MoE families schedmoe.hf converts (8 experts,
fp32), for the tests and experiments. Every parameter and the selection bias are drawn from a
seeded RNG (some families initialise routers or biases to zero, which would hide mistakes)."""

from __future__ import annotations

import torch

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=24, moe_intermediate_size=12,
                       shared_expert_intermediate_size=20, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=24, moe_intermediate_size=12, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                   eos_token_id=VOCAB - 1, pad_token_id=0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                         first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=None,
                         num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=4, num_hidden_layers=3,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=8, sliding_window=8)),
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """An eval-mode tiny model of `family`; `overrides` change its config."""
    import transformers

    config_name, model_name, options = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **options, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    return model.to(dtype).eval()


def token_ids(rank: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (batch, length),
                         generator=torch.Generator().manual_seed(100 + rank))
