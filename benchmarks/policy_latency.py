"""In-process ``predict_action`` latency of untrained PushT policies: p50 / p99 after warm-up.

Each call is one request end to end: observation normalisation, vision encoder (image config), the whole
denoising loop and unnormalisation, timed until the NumPy actions are returned. Prints a table and
writes JSON.

    dpmlx bench policy --configs lowdim,image --samplers ddim10,ddim16,ddpm100 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIGS = {
    "lowdim": "configs/pusht_lowdim.yaml",
    "image": "configs/pusht_image.yaml",
    "transformer_lowdim": "configs/pusht_transformer_lowdim.yaml",
    "transformer_image": "configs/pusht_transformer_image.yaml",
}
SAMPLERS = {"ddim10": ("ddim", 10), "ddim16": ("ddim", 16), "ddpm100": ("ddpm", 100)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="lowdim", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--samplers", default="ddim10", help=f"comma list of {sorted(SAMPLERS)}")
    parser.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per row (compilation)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap on timed seconds per row")
    parser.add_argument("--batch", type=int, default=1, help="observations per call")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("runs/policy_latency.json"),
        help="write the rows here",
    )


def _policy(config_name: str, dtype: str):
    import numpy as np
    import yaml

    from policy_core import build_policy
    from policy_core.normalizer import LinearNormalizer, fit_limits, image_range

    root = Path(__file__).resolve().parent.parent
    section = yaml.safe_load((root / CONFIGS[config_name]).read_text())["policy"]
    section["dtype"] = dtype
    policy = build_policy(section)
    # Untrained: statistics of the PushT workspace (pixels 0..512) stand in for fitted ones.
    rng = np.random.default_rng(0)
    normalizer = LinearNormalizer({"action": fit_limits(rng.uniform(0, 512, (1000, 2)))})
    for key, feat in policy.config.obs.items():
        normalizer[key] = (
            image_range(feat.shape[0])
            if feat.is_image
            else fit_limits(rng.uniform(0, 512, (1000, feat.shape[0])))
        )
    policy.normalizer = normalizer
    return policy


def _observation(policy, batch: int):
    import numpy as np

    rng = np.random.default_rng(1)
    cfg = policy.config
    obs = {}
    for key, feat in cfg.obs.items():
        shape = (batch, cfg.n_obs_steps, *feat.hwc_shape)
        obs[key] = (
            rng.integers(0, 256, shape, dtype=np.uint8)
            if feat.is_image
            else rng.uniform(0, 512, shape).astype(np.float32)
        )
    return obs


def run(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from policy_core.backends import cuda
    from policy_core.info import environment_report

    cuda.use_direct_launches()  # as the server does
    rows = []
    for config_name in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            policy = _policy(config_name, dtype)
            obs = _observation(policy, args.batch)
            for sampler_name in args.samplers.split(","):
                kind, steps = SAMPLERS[sampler_name]
                for i in range(args.warmup):
                    policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=i)
                times = []
                budget_end = time.perf_counter() + args.max_seconds
                for i in range(args.iters):
                    start = time.perf_counter()
                    policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=i)
                    times.append((time.perf_counter() - start) * 1e3)
                    if time.perf_counter() > budget_end:
                        break
                t = np.array(times)
                row = {
                    "config": config_name,
                    "dtype": dtype,
                    "sampler": sampler_name,
                    "batch": args.batch,
                    "n": len(t),
                    "p50_ms": float(np.percentile(t, 50)),
                    "p99_ms": float(np.percentile(t, 99)),
                    "mean_ms": float(t.mean()),
                }
                rows.append(row)
                print(
                    f"{config_name:7s} {dtype:9s} {sampler_name:8s} B={args.batch:<3d} n={len(t):<4d} "
                    f"p50 {row['p50_ms']:9.2f} ms   p99 {row['p99_ms']:9.2f} ms",
                    flush=True,
                )
    report = {"environment": environment_report(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return rows


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
