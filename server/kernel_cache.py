"""Compiled paths run once, to compile them: by a server's warm-up, and by a process of their own.

A compiled path of a policy is a ``CompileKey``: the padded batch size, the sampler, its steps and the
real-time chunking method (None for a plain request). The first run of a path traces MLX's compiled
functions and compiles the fused kernels they need; MLX keeps those kernels in a cache on disk, shared by
every process. ``python -m server.kernel_cache CHECKPOINT KEY...`` runs the paths in a process of its own,
so that the compiler's seconds (with an empty cache) hold up no request: a lazily warmed server answers
without compiled functions meanwhile, then traces each path against the filled cache
(``server.models.ModelWorker``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from policy_core.rtc import ActionPrefix

CompileKey = tuple[int, str, int, str | None]
"""(padded rows, sampler, steps, real-time chunking method or None)."""


def key_text(key: CompileKey) -> str:
    """``rows:sampler:steps[:method]``, the form the command line and /v1/stats use."""
    rows, kind, steps, method = key
    return f"{rows}:{kind}:{steps}" + (f":{method}" if method else "")


def parse_key(text: str) -> CompileKey:
    rows, kind, steps, *method = text.split(":")
    return int(rows), kind, int(steps), method[0] if method else None


def run_path(policy: Any, schema: dict[str, Any], key: CompileKey) -> np.ndarray:
    """The policy's actions (``action_pred``) for zero observations along the path ``key``, seed 0."""
    rows, kind, steps, method = key
    obs = {k: np.zeros((rows, *spec["shape"]), dtype=spec["dtype"]) for k, spec in schema.items()}
    prefixes = None
    if method is not None:  # one constrained row: the batch takes the method's path
        actions = np.zeros((1, policy.config.action_dim), np.float32)
        prefixes = [ActionPrefix(actions, 1, method=method)] + [None] * (rows - 1)
    out = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=0, prefixes=prefixes)
    return out["action_pred"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.kernel_cache", description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("keys", nargs="+", type=parse_key, help="rows:sampler:steps[:method]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    from policy_core.checkpoint import policy_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    policy = policy_from_checkpoint(ckpt, dtype=args.dtype)
    for key in args.keys:
        run_path(policy, ckpt.metadata["obs_schema"], key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
