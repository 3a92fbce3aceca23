"""Exception types raised by schedmoe.

Every error a user can trigger has its own type, so callers can catch exactly what they expect,
and every message says what to change.
"""


class SchedMoEError(Exception):
    """Base class of every schedmoe error."""


class ConfigError(SchedMoEError, ValueError):
    """A layer or op was built with arguments that cannot work (e.g. experts % world != 0)."""


class ConfigMismatchError(SchedMoEError):
    """Ranks of one expert-parallel group built the layer with different arguments."""


class InputError(SchedMoEError, ValueError):
    """The input of a forward pass is malformed (shape, dtype, non-finite values)."""


class RegistryError(SchedMoEError, LookupError):
    """A plugin name is unknown, registered twice, or of the wrong type."""


class A2AError(SchedMoEError, ValueError):
    """An all-to-all was called with split sizes or shapes that do not fit the group."""


class PeerError(SchedMoEError):
    """A collective failed because a peer rank died, timed out, or never called in."""


class StepError(SchedMoEError, RuntimeError):
    """A rank failed in its own part of a layer call (routing, say) before the exchange; every
    rank of the group raises it, naming the rank and its original error."""


class RankError(SchedMoEError):
    """One or more ranks spawned by schedmoe.tools.launch failed; the message holds their
    tracebacks."""


class UnsupportedModelError(SchedMoEError, TypeError):
    """schedmoe.hf was given a model or MoE block type it does not know how to convert."""


class CheckpointError(SchedMoEError, ValueError):
    """A checkpoint or state dict does not fit the model it is loaded into (other experts,
    another num_experts or expert shape)."""
