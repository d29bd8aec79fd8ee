"""Arguments and entry points of ``dpmlx train`` and ``dpmlx bench train``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
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
    parser.add_argument(
        "--distill",
        type=Path,
        metavar="TEACHER",
        help="distil this diffusion policy checkpoint into a 1-3 step consistency policy (distill.teacher)",
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
    """The YAML at ``path`` with ``--set`` overrides; ConfigError (one line for the user) when either is
    wrong. Field names and values are checked when the trainer is built."""
    import yaml

    from policy_core import ConfigError

    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected sections policy, data and train, got {config!r}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for depth, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parents[: depth + 1])} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    return config


def _user_errors(command: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a user's mistake (a config, data or checkpoint that does not fit) reported as one
    line and exit status 2 instead of a traceback."""
    from policy_core import CheckpointError, ConfigError

    try:
        return build()
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"dpmlx {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def train_main(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from trainer.train import Trainer

    config = _user_errors("train", lambda: load_config(args.config, args.set))
    if args.distill is not None:
        config["distill"] = {**(config.get("distill") or {}), "teacher": str(args.distill)}
    out = args.out or Path("runs") / args.config.stem
    latest = out / "latest.safetensors"
    step = None
    try:
        group = mx.distributed.init() if args.distributed else None
        trainer = _user_errors("train", lambda: Trainer(config, out, resume=args.resume, group=group))
        step = start_step = trainer.step
        started = time.perf_counter()
        last = trainer.run()
    except KeyboardInterrupt:  # before training, or a second Ctrl-C: quit at once
        where = "before training started" if step is None else f"at step {trainer.step}"
        print(f"\ninterrupted {where}; {latest} was not updated", file=sys.stderr)
        return 130
    if trainer.rank != 0:
        return 0
    if trainer.interrupted:
        print(f"Interrupted at step {trainer.step} of {trainer.train.num_steps}: saved {latest}; "
              "continue with --resume.")  # fmt: skip
        return 130
    if not last:
        print(f"Nothing to do: {latest} is at step {trainer.step} of {trainer.train.num_steps}.")
        return 0
    losses = f"loss {last['loss']:.4f}"
    if "val_loss" in last:
        losses += f", validation loss {last['val_loss']:.4f}"
    rate = last["samples_per_s"] / trainer.train.batch_size
    print(
        f"Trained to step {trainer.step} ({trainer.step - start_step} steps in "
        f"{time.perf_counter() - started:.0f} s, {rate:.1f} steps/s at the end): {losses}; "
        f"the policy to serve is {latest}."
    )
    return 0


def bench_main(args: argparse.Namespace) -> int:
    import tempfile

    from trainer.train import Trainer

    config = _user_errors("bench train", lambda: load_config(args.config, args.set))
    warmup = 3
    config.setdefault("train", {}).update(
        num_steps=warmup + args.steps, log_every=10**9, val_every=10**9, checkpoint_every=10**9
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _user_errors("bench train", lambda: Trainer(config, Path(tmp)))
        trainer.run(warmup, progress=False)
        start = time.perf_counter()
        trainer.run(warmup + args.steps, progress=False)
        elapsed = time.perf_counter() - start
    batch = trainer.train.batch_size
    rate = args.steps / elapsed
    print(f"{args.config.name}: batch {batch}, {rate:.2f} steps/s, {rate * batch:.0f} samples/s")
    return 0
