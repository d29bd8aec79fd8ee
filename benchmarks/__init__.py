import importlib
from types import ModuleType


def mlx_core() -> ModuleType:
    """``mlx.core``, imported after policy_core, which binds MLX to the optimised BLAS first (an import
    block sorted by name would import mlx before policy_core)."""
    import policy_core  # noqa: F401

    return importlib.import_module("mlx.core")
