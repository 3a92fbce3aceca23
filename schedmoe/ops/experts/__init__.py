"""Expert forms, each registered by name: `ffn` (Linear-activation-Linear), `swiglu`,
`clamped_glu` (GPT-OSS), run batched over the local experts, padded (`forward`) or on ragged
rows (`forward_ragged`, grouped GEMMs); the shared experts; the state-dict hooks that record
which global experts a rank holds (`ranges.py`); and the weights of replica slots
(`replicas.py`: logical rows <-> slots, fill, move, gradient sum).

Data plane. May import: `errors`, `registry`, `comm`.
"""

from .forms import (ClampedGLUExpert, Expert, FFNExpert, SwiGLUExpert, activation_name,
                    is_expert_parameter, mark_expert_parameters)
from .shared import SharedExperts

__all__ = ["Expert", "FFNExpert", "SwiGLUExpert", "ClampedGLUExpert", "SharedExperts",
           "activation_name", "is_expert_parameter", "mark_expert_parameters"]
