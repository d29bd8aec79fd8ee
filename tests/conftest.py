# policy_core must be imported before mlx so MLX binds to the optimised BLAS (policy_core/blas.py).
import policy_core  # noqa: F401
