"""Arguments of ``dpmlx eval pusht`` (argparse only, so building the CLI stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

from proto.messages import SCHEDULERS

EXECUTIONS = ("sync", "naive", "ensemble", "rtc", "rtc-replace")


def add_eval_arguments(parser: argparse.ArgumentParser, demo: bool = False) -> None:
    """``demo``: the arguments of ``dpmlx demo`` (no --server, a few episodes, a GIF by default)."""
    if not demo:
        parser.add_argument("--server", default="tcp://127.0.0.1:5555", help="ZeroMQ address of dpmlx serve")
    parser.add_argument("--episodes", type=int, default=3 if demo else 50, help="episodes to run")
    parser.add_argument("--start-seed", type=int, default=100000, help="upstream's test seeds start here")
    parser.add_argument("--max-steps", type=int, default=300, help="control steps per episode at most")
    parser.add_argument("--realtime", action="store_true", help="10 Hz wall-clock loop with latency hiding")
    parser.add_argument(
        "--delay",
        type=int,
        default=0,
        help="simulated inference delay in control ticks: a chunk for the observation of tick t is usable "
        "from tick t + DELAY, the old chunk keeps running meanwhile (no wall clock; not with --realtime)",
    )
    parser.add_argument(
        "--execution",
        choices=EXECUTIONS,
        default="sync",
        help="how chunks follow each other: sync (wait for each, holding still), naive (switch when it "
        "arrives), ensemble (temporal ensembling), rtc (real-time chunking, guided inpainting), "
        "rtc-replace (replacement inpainting); with --realtime the loop always prefetches (sync = naive)",
    )
    parser.add_argument(
        "--rtc-schedule",
        choices=["exp", "linear", "hard"],
        help="rtc: prefix weights (default: the server's, exp)",
    )
    parser.add_argument(
        "--rtc-max-guidance", type=float, help="rtc: the guidance weight's clip (default: the server's, 40)"
    )
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    parser.add_argument(
        "--scheduler", choices=SCHEDULERS, help="sampler (default: the model's; hello lists the model's)"
    )
    parser.add_argument(
        "--video",
        type=Path,
        default=Path("runs/demo") if demo else None,
        help="folder for GIFs of the first --video-episodes episodes and the latency plot",
    )
    parser.add_argument("--video-episodes", type=int, default=4, help="how many episodes get a GIF")
    parser.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        help="seed of the policy's noise: the same arguments give the same episodes and score",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
