"""MLX's per-thread state, released while the interpreter still runs."""

from __future__ import annotations

import mlx.core as mx


def release_mlx_thread_state() -> None:
    """Drop the calling thread's MLX streams and compile cache (``mx.clear_streams``).

    Every thread that did MLX work calls this last, and the main thread before the interpreter exits.
    Otherwise MLX frees them from the thread's exit handlers, after its Python code has ended: those
    take the GIL to drop compiled functions, and if the interpreter is finalizing meanwhile (a worker
    thread ending as the main thread exits) the process aborts with "terminate called without an active
    exception" (MLX asks callers to clear the streams themselves)."""
    mx.clear_streams()
