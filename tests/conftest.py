import os

import pytest

# On MLX's CUDA backend fp32 matmuls and convolutions default to TF32 (~1e-3); the parity tests compare
# fp32 with fp32. Read by MLX at its first GPU op, so set before anything runs.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# policy_core must be imported before mlx so MLX binds to the optimised BLAS (backends/cpu_blas.py).
import policy_core  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _restore_mlx_use_cuda_graphs():
    """Code under test may set MLX_USE_CUDA_GRAPHS for the process (cuda.use_direct_launches); later
    tests' subprocesses, the trainer's among them, must not inherit it."""
    before = os.environ.get("MLX_USE_CUDA_GRAPHS")
    yield
    if before is None:
        os.environ.pop("MLX_USE_CUDA_GRAPHS", None)
    else:
        os.environ["MLX_USE_CUDA_GRAPHS"] = before


def pytest_sessionfinish(session, exitstatus):
    """The main thread's MLX state, released before the interpreter exits (policy_core/threads.py)."""
    from policy_core.threads import release_mlx_thread_state

    release_mlx_thread_state()
