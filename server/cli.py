"""Arguments of ``dpmlx serve`` (argparse only, so building the CLI stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="policy checkpoint to serve at start-up; the process exits if it cannot be loaded (default: "
        "the shipped PushT policy, unless --watch)",
    )
    parser.add_argument(
        "--zmq", default="tcp://127.0.0.1:5555", help="ZeroMQ bind address (tcp:// or ipc://)"
    )
    parser.add_argument("--http", default="127.0.0.1:8000", help="control plane HOST:PORT (port 0: any free)")
    parser.add_argument(
        "--watch",
        type=Path,
        help="hot-load each new checkpoint written to this folder (waits while it has none)",
    )
    parser.add_argument(
        "--token", help="bearer token for mutating control-plane endpoints (or the DPMLX_TOKEN variable)"
    )
    parser.add_argument(
        "--model-root",
        type=Path,
        help="folder that POST /v1/models/load may load from; paths and links leading out of it are "
        "refused (default: the current directory)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=8, help="most rows one batch computes (and one request may carry)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a batch's first request may wait for as many requests as the last batch of the "
        "same options saw (a lone client never waits; 0: batch only what queued meanwhile)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests queued per model before answering `overloaded`"
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=16.0,
        help="largest request accepted, in MiB (larger ones are answered `too_large`)",
    )
    parser.add_argument(
        "--max-normalized-obs",
        type=float,
        default=100.0,
        help="refuse low-dimensional observations whose magnitude, normalized by the model's training "
        "statistics (fitted range -> [-1, 1]), exceeds this, as invalid_observation (0: no check)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, serve queued requests for this many seconds, then answer the rest "
        "shutting_down (batches in flight finish)",
    )
    parser.add_argument(
        "--warmup",
        choices=["lazy", "full"],
        default="lazy",
        help="lazy: serve as soon as the weights are loaded and checked on one batch; requests whose "
        "compiled path is not ready run uncompiled while a background process fills MLX's kernel cache "
        "and the paths are traced between batches. full: compile every batch bucket first (/readyz "
        "answers 503 until then); paths first met later (another sampler, step count or real-time "
        "chunking method) are compiled in the background all the same. Hot loads of another architecture "
        "always warm up fully while the active model serves",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="log where each load's time went (read, verify, weights, warm-up and traces per path)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype of every loaded model (default: each checkpoint's own)",
    )
