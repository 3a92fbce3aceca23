"""Routers ("gates"): which experts each token goes to, with what weight, and the aux losses.

- `topk` (softmax.py): softmax over all experts, top-k, optional renormalisation (GShard,
  Mixtral, Qwen-MoE, OLMoE).
- `topk_softmax` (softmax.py): top-k of the logits, softmax over the k (GPT-OSS), router bias.
- `sigmoid_grouped` (sigmoid.py): sigmoid scores, a selection-only bias, group-limited top-k and
  a routed scaling factor (DeepSeek-V3), and auxiliary-loss-free balancing of that bias.
- balance.py: the balance losses (GShard, top-k, sequence-wise, global-batch) the layer adds.

- `capacity.py`: every pair's slot in its expert's buffer and this rank's capacity limit.
- `route.py`: one rank's routing of a call (router, slots, limit, split sizes).

Data plane. May import: `errors`, `registry`, `comm` (the host copy of the split sizes),
`streams` (the lane of shared state).
"""

from .balance import BALANCE_LOSSES, balance_loss, update_balancing_biases
from .base import Router, Routing, z_loss
from .sigmoid import GroupLimitedSigmoidRouter
from .softmax import TopKRouter, TopKSoftmaxRouter

__all__ = ["Router", "Routing", "balance_loss", "z_loss", "TopKRouter", "TopKSoftmaxRouter",
           "GroupLimitedSigmoidRouter", "BALANCE_LOSSES", "update_balancing_biases"]
