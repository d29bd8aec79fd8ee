"""The ``dpmlx`` command: one entry point, one subcommand per job.

Subcommand modules are imported lazily so that, e.g., ``dpmlx info`` does not load the benchmark code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from functools import partial
from typing import Any


def _info(args: argparse.Namespace) -> int:
    from policy_core.info import environment_report, format_report

    print(format_report(environment_report()))
    return 0


def _bench_policy(args: argparse.Namespace) -> int:
    from benchmarks.policy_latency import main as bench_main

    return bench_main(args)


def _serve(args: argparse.Namespace) -> int:
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from server.app import serve_main

    return serve_main(args)


def _convert(args: argparse.Namespace) -> int:
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from policy_core.convert.cli import main as convert_main

    return convert_main(args)


def _bench_latency(args: argparse.Namespace) -> int:
    from clients.bench import main as bench_main

    return bench_main(args)


def _data_pusht(args: argparse.Namespace) -> int:
    from trainer.pusht_data import main as data_main

    return data_main(args)


def _eval_pusht(args: argparse.Namespace) -> int:
    from clients.sim.eval_pusht import main as eval_main

    return eval_main(args)


def _train(args: argparse.Namespace) -> int:
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from trainer.cli import train_main

    return train_main(args)


def _bench_train(args: argparse.Namespace) -> int:
    import policy_core  # noqa: F401
    from trainer.cli import bench_main

    return bench_main(args)


def _demo(args: argparse.Namespace) -> int:
    """Serve the shipped policy in-process, run PushT episodes through the ZeroMQ client, shut down."""
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from clients.sim.eval_pusht import main as eval_main
    from policy_core.backends import cuda
    from server.app import ServeConfig, Server
    from server.models import SHIPPED_CHECKPOINT

    cuda.use_direct_launches()  # an inference-only process, like dpmlx serve
    server = Server(
        ServeConfig(
            checkpoint=SHIPPED_CHECKPOINT,
            zmq="tcp://127.0.0.1:*",
            http_port=0,
            model_root=SHIPPED_CHECKPOINT.parent,
        )
    )
    print(f"loading the shipped PushT policy ({SHIPPED_CHECKPOINT.name})", flush=True)
    server.start()
    try:
        initial = server.initial_load
        if not initial.loaded.wait(300) or initial.error is not None:
            print(f"dpmlx demo: cannot serve: {server.manager.last_error or 'timed out'}", file=sys.stderr)
            return 1
        args.server = server.zmq_endpoint
        return eval_main(args)
    finally:
        server.shutdown()


# The packages of the full product. The wheel (`pip install .`) is the robot-side client only; these
# run from the source checkout, installed with `pip install -e` (scripts/setup.sh).
PRODUCT_PACKAGES = ("policy_core", "server", "trainer", "benchmarks")


def _install_hint(extra: str) -> str:
    if extra in ("sim", "plot"):  # client-side extras: the wheel takes them
        return f"pip install '.[{extra}]' in the source checkout"
    return f"pip install -e '.[{extra}]' in the source checkout (scripts/setup.sh installs everything)"


Arguments = Callable[[argparse.ArgumentParser], None]


def _arguments(module: str, function: str) -> Arguments | None:
    """A subcommand's argument builder, or None where a client-only install leaves its package out."""
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in PRODUCT_PACKAGES:
            raise
        return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every help text that has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    arguments: Arguments | None,
    func: Callable[[argparse.Namespace], int],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """``arguments`` None: the command's package is not installed; it is listed and explains itself."""
    if arguments is None:
        parser = sub.add_parser(name, help=f"{help} [not in this client-only install]", add_help=False)
        parser.set_defaults(func=_not_installed)
        return parser
    parser = sub.add_parser(name, help=help, formatter_class=_HelpFormatter, **kwargs)
    arguments(parser)
    parser.set_defaults(func=func)
    return parser


def _not_installed(args: argparse.Namespace) -> int:
    command = _command_name(args)
    extra = COMMAND_EXTRA.get(command, "server")
    print(
        f"dpmlx {command} is part of the full product, which this client-only install leaves out: "
        f"{_install_hint(extra)}",
        file=sys.stderr,
    )
    return 2


def _export(args: argparse.Namespace) -> int:
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from policy_core import CheckpointError
    from policy_core.checkpoint import export_policy

    try:
        sha = export_policy(args.src, args.out, args.name)
    except (CheckpointError, OSError) as e:
        print(f"dpmlx export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {sha[:12]})")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a checkpoint written by dpmlx train")
    parser.add_argument("--out", required=True, help="the .safetensors to write")
    parser.add_argument("--name", help="the model's name (hello's model.name)")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="LeRobot pretrained_model/ folder (or its parent) or a .ckpt file")
    parser.add_argument("--out", required=True, help="output .safetensors checkpoint")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", help=".ckpt: EMA weights (default)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help=".ckpt: the raw model weights")
    parser.add_argument("--control-hz", type=float, help="control rate stored in the metadata (default 10)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help=".ckpt: unpickle it fully, as upstream does (runs any code it holds: trusted files only)",
    )
    parser.set_defaults(use_ema=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmlx", description="Diffusion Policy on MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    def no_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    _add_command(
        sub, "info", "MLX version, backend, device, memory and BLAS (for bug reports)", no_arguments, _info
    )
    _add_command(
        sub,
        "serve",
        "serve a policy over ZeroMQ with an HTTP control plane",
        _arguments("server.cli", "add_arguments"),
        _serve,
    )
    _add_command(
        sub,
        "convert",
        "convert a LeRobot diffusion policy or a Diffusion Policy .ckpt to our checkpoint format",
        _convert_arguments,
        _convert,
        description="Convert a LeRobot diffusion pretrained_model/ folder (no PyTorch needed) or a "
        "real-stanford/diffusion_policy workspace .ckpt (needs torch, dill, omegaconf) into a .safetensors "
        "checkpoint that `dpmlx serve` loads. A .ckpt is a pickle that can run arbitrary code when read: it "
        "is read weights-only, refusing any type upstream checkpoints do not hold (the error names it); "
        "--trust-pickle reads it fully: convert only files you trust, never files received over the network.",
    )
    _add_command(
        sub,
        "export",
        "a training checkpoint's served (EMA) weights without its trainer state: a checkpoint to ship",
        _export_arguments,
        _export,
    )
    _add_command(
        sub,
        "train",
        "train a policy from demonstrations (writes hot-loadable checkpoints)",
        _arguments("trainer.cli", "add_train_arguments"),
        _train,
    )

    data_arguments = _arguments("trainer.pusht_cli", "add_data_arguments")
    if data_arguments is None:
        _add_command(sub, "data", "generate demonstration data", None, _data_pusht)
    else:
        data = sub.add_parser("data", help="generate demonstration data")
        _add_command(
            data.add_subparsers(dest="task", required=True),
            "pusht",
            "PushT demonstrations from the planning expert (zarr)",
            data_arguments,
            _data_pusht,
        )

    from clients.sim.cli import add_eval_arguments

    _add_command(
        sub,
        "demo",
        "serve the shipped PushT policy and run episodes through the client",
        partial(add_eval_arguments, demo=True),
        _demo,
    )
    evaluate = sub.add_parser("eval", help="closed-loop evaluation through the server")
    _add_command(
        evaluate.add_subparsers(dest="task", required=True),
        "pusht",
        "PushT episodes via PolicyClient / ActionChunkRunner",
        add_eval_arguments,
        _eval_pusht,
    )

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    _add_command(
        bench,
        "policy",
        "in-process predict_action latency (untrained policies)",
        _arguments("benchmarks.policy_latency", "add_arguments"),
        _bench_policy,
    )
    _add_command(
        bench,
        "latency",
        "request latency against a running server (client side)",
        _arguments("clients.bench", "add_arguments"),
        _bench_latency,
    )
    _add_command(
        bench,
        "train",
        "training throughput: steps/s and samples/s",
        _arguments("trainer.cli", "add_bench_arguments"),
        _bench_train,
    )
    return parser


# Which extra brings each optional top-level module.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("mlx", "fastapi", "fastapi_offline", "uvicorn", "yaml"), "server"),
    **dict.fromkeys(("pymunk", "gymnasium", "PIL"), "sim"),
    **dict.fromkeys(("zarr", "numcodecs", "tqdm"), "train"),
}
# The extra a command needs as a whole: `dpmlx train` missing mlx needs [train], not just [server].
COMMAND_EXTRA = {"train": "train", "data": "train", "bench train": "train", "demo": "server,sim"}


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "bench_command", None) if args.command == "bench" else None
    return f"bench {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _not_installed:  # a missing command takes any arguments
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        # A client-only install has numpy, pyzmq and msgpack: say what to install instead of a traceback.
        top = (e.name or "").split(".")[0]
        command = _command_name(args)
        if top in PRODUCT_PACKAGES:
            return _not_installed(args)
        extra = EXTRA_OF_MODULE.get(top)
        if extra is None:
            raise
        extra = COMMAND_EXTRA.get(command, extra)
        print(
            f"dpmlx {command} needs {e.name}, which this install leaves out: "
            f"diffusion-policy-mlx[{extra}]: {_install_hint(extra)}",
            file=sys.stderr,
        )
        return 2


def cli() -> None:
    """The ``dpmlx`` command: ``main``, then the main thread's MLX state released before the interpreter
    exits (policy_core/threads.py). ``main`` itself leaves it alone, for callers that go on using MLX."""
    try:
        code = main()
    finally:
        if "mlx.core" in sys.modules:
            from policy_core.threads import release_mlx_thread_state

            release_mlx_thread_state()
    sys.exit(code)


if __name__ == "__main__":
    cli()
