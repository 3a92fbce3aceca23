"""schedmoe: a mixture-of-experts layer that schedules its all-to-all traffic.

    layer = schedmoe.MoELayer(model_dim=512, num_experts=8, hidden_dim=2048)
    y = layer(x)              # x: [..., 512]
    loss = task_loss + 0.01 * y.l_aux
"""

from . import a2a_algos, ops, routing, schedulers  # noqa: F401  (registers the built-ins)
from .errors import (A2AError, ConfigError, ConfigMismatchError, InputError, PeerError,
                     RankError, RegistryError, SchedMoEError, StepError,
                     UnsupportedModelError)
from .control.options import MoEConfig
from .control.stats import LayerStats
from .layer import MoELayer
from .parallel.identity import expert_parameters, non_expert_parameters
from .registry import (register_a2a, register_compressor, register_expert, register_gate,
                       register_scheduler, registry)

__version__ = "0.1.0"

__all__ = [
    "MoELayer", "MoEConfig", "LayerStats", "expert_parameters", "non_expert_parameters",
    "registry", "register_a2a", "register_compressor", "register_expert", "register_gate",
    "register_scheduler", "SchedMoEError", "ConfigError", "ConfigMismatchError", "InputError",
    "RegistryError", "A2AError", "PeerError", "RankError", "StepError", "UnsupportedModelError",
]
