"""MLX Diffusion Policy: model, schedulers, normalizer, and the checkpoint format.

The optimised-BLAS preload must run before anything imports ``mlx.core`` (see ``backends/cpu_blas.py``).
"""

from policy_core.backends import cpu_blas

cpu_blas.preload()

from policy_core.checkpoint import (  # noqa: E402
    Checkpoint,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    load_policy,
    read_checkpoint,
    save_policy,
)
from policy_core.config import ConfigError, PolicyConfig  # noqa: E402
from policy_core.normalizer import LinearNormalizer  # noqa: E402
from policy_core.policy import (  # noqa: E402
    DiffusionPolicy,
    DiffusionTransformerPolicy,
    DiffusionUnetPolicy,
    ObservationError,
    build_policy,
)

__all__ = [
    "Checkpoint",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "ConfigError",
    "DiffusionPolicy",
    "DiffusionTransformerPolicy",
    "DiffusionUnetPolicy",
    "LinearNormalizer",
    "ObservationError",
    "PolicyConfig",
    "build_policy",
    "load_policy",
    "read_checkpoint",
    "save_policy",
]
