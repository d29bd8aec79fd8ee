"""Arguments and entry points of ``dpmlx train`` and ``dpmlx bench train``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML with policy, data and train sections"
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue exactly from <out>/latest.safetensors"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field: train.num_steps=2000",
    )
    parser.add_argument(
        "--distributed", action="store_true", help="data-parallel over mx.distributed (mlx.launch)"
    )


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML with policy, data and train sections"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field: train.batch_size=64",
    )


def load_config(path: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(path.read_text())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(raw)
    return config


def train_main(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from trainer.train import Trainer

    config = load_config(args.config, args.set)
    out = args.out or Path("runs") / args.config.stem
    group = mx.distributed.init() if args.distributed else None
    trainer = Trainer(config, out, resume=args.resume, group=group)
    last = trainer.run()
    if trainer.rank == 0:
        print(f"step {trainer.step}: {last}; checkpoints in {out} (latest.safetensors)")
    return 0


def bench_main(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from trainer.train import Trainer

    config = load_config(args.config, args.set)
    warmup = 3
    config.setdefault("train", {}).update(
        num_steps=warmup + args.steps, log_every=10**9, val_every=10**9, checkpoint_every=10**9
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp))
        trainer.run(warmup, progress=False)
        start = time.perf_counter()
        trainer.run(warmup + args.steps, progress=False)
        elapsed = time.perf_counter() - start
    batch = trainer.train.batch_size
    rate = args.steps / elapsed
    print(f"{args.config.name}: batch {batch}, {rate:.2f} steps/s, {rate * batch:.0f} samples/s")
    return 0
