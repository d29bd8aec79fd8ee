import os

# On MLX's CUDA backend fp32 matmuls and convolutions default to TF32 (~1e-3); the parity tests compare
# fp32 with fp32. Read by MLX at its first GPU op, so set before anything runs.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# policy_core must be imported before mlx so MLX binds to the optimised BLAS (policy_core/blas.py).
import policy_core  # noqa: E402, F401
