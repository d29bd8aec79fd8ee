"""``dpmlx convert``: the command body (its arguments are declared in dpmlx.py so building the CLI stays
free of MLX imports)."""

from __future__ import annotations

import argparse
import sys
import warnings

from policy_core.convert import ConversionError, UnsafePickleWarning, convert


def main(args: argparse.Namespace) -> int:
    if args.trust_pickle:
        print(
            f"dpmlx convert: warning: --trust-pickle: {args.src} is fully unpickled, and any code it holds "
            "runs now, with your permissions",
            file=sys.stderr,
        )
    try:
        with warnings.catch_warnings():  # said once, above
            warnings.simplefilter("ignore", UnsafePickleWarning)
            converted, sha = convert(
                args.src,
                args.out,
                use_ema=args.use_ema,
                control_hz=args.control_hz,
                trust_pickle=args.trust_pickle,
            )
    except ConversionError as e:
        print(f"dpmlx convert: {e}", file=sys.stderr)
        return 2
    cfg = converted.policy.config
    obs = ", ".join(f"{k} {list(f.shape)}" for k, f in cfg.obs.items())
    print(
        f"wrote {args.out} ({converted.provenance['source_format']}; obs {obs}; action {cfg.action_dim}; "
        f"sampler {cfg.sampler} x{cfg.default_inference_steps}; sha256 {sha[:12]})"
    )
    return 0
