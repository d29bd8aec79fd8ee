"""The ``dpmlx`` command: one entry point, one subcommand per job.

Subcommand modules are imported lazily so that, e.g., ``dpmlx info`` does not load the benchmark code.
"""

from __future__ import annotations

import argparse
import sys


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
    from policy_core import unet_cuda
    from server.app import ServeConfig, Server
    from server.models import SHIPPED_CHECKPOINT

    unet_cuda.use_direct_launches()  # an inference-only process, like dpmlx serve
    server = Server(
        ServeConfig(checkpoint=SHIPPED_CHECKPOINT, zmq="tcp://127.0.0.1:*", http_port=0,
                    model_root=SHIPPED_CHECKPOINT.parent)
    )  # fmt: skip
    server.start()
    try:
        if not server.manager.wait_for_load(300) or server.manager.active is None:
            print(f"could not load {SHIPPED_CHECKPOINT}: {server.manager.last_error}", file=sys.stderr)
            return 1
        args.server = server.zmq_endpoint
        return eval_main(args)
    finally:
        server.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmlx", description="Diffusion Policy on MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="MLX version, backend, device, memory and BLAS (for bug reports)")
    info.set_defaults(func=_info)

    serve = sub.add_parser("serve", help="serve a policy over ZeroMQ with an HTTP control plane")
    from server.cli import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    convert = sub.add_parser(
        "convert",
        help="convert a LeRobot diffusion policy or a Diffusion Policy .ckpt to our checkpoint format",
        description="Convert a LeRobot diffusion pretrained_model/ folder (no PyTorch needed) or a "
        "real-stanford/diffusion_policy workspace .ckpt (needs torch, dill, omegaconf) into a .safetensors "
        "checkpoint that `dpmlx serve` loads. A .ckpt is a pickle that can run arbitrary code when read: it "
        "is read weights-only, refusing any type upstream checkpoints do not hold (the error names it); "
        "--trust-pickle reads it fully: convert only files you trust, never files received over the network.",
    )
    convert.add_argument("src", help="LeRobot pretrained_model/ folder (or its parent) or a .ckpt file")
    convert.add_argument("--out", required=True, help="output .safetensors checkpoint")
    ema = convert.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", help=".ckpt: EMA weights (default)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help=".ckpt: the raw model weights")
    convert.add_argument("--control-hz", type=float, help="control rate stored in the metadata (default 10)")
    convert.add_argument(
        "--trust-pickle",
        action="store_true",
        help=".ckpt: unpickle it fully, as upstream does (runs any code it holds: trusted files only)",
    )
    convert.set_defaults(func=_convert, use_ema=None)

    from trainer.cli import add_bench_arguments, add_train_arguments

    train = sub.add_parser(
        "train", help="train a policy from demonstrations (writes hot-loadable checkpoints)"
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)

    data = sub.add_parser("data", help="generate demonstration data").add_subparsers(
        dest="task", required=True
    )
    from trainer.pusht_cli import add_data_arguments

    pusht_data = data.add_parser("pusht", help="PushT demonstrations from the planning expert (zarr)")
    add_data_arguments(pusht_data)
    pusht_data.set_defaults(func=_data_pusht)

    from clients.sim.cli import add_eval_arguments

    demo = sub.add_parser("demo", help="serve the shipped PushT policy and run episodes through the client")
    add_eval_arguments(demo, demo=True)
    demo.set_defaults(func=_demo)

    evaluate = sub.add_parser("eval", help="closed-loop evaluation through the server")
    eval_sub = evaluate.add_subparsers(dest="task", required=True)

    pusht_eval = eval_sub.add_parser("pusht", help="PushT episodes via PolicyClient / ActionChunkRunner")
    add_eval_arguments(pusht_eval)
    pusht_eval.set_defaults(func=_eval_pusht)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from benchmarks.policy_latency import add_arguments

    policy = bench_sub.add_parser("policy", help="in-process predict_action latency (untrained policies)")
    add_arguments(policy)
    policy.set_defaults(func=_bench_policy)

    from clients.bench import add_arguments as add_latency_arguments

    latency = bench_sub.add_parser("latency", help="request latency against a running server (client side)")
    add_latency_arguments(latency)
    latency.set_defaults(func=_bench_latency)

    bench_train = bench_sub.add_parser("train", help="training throughput: steps/s and samples/s")
    add_bench_arguments(bench_train)
    bench_train.set_defaults(func=_bench_train)
    return parser


# Which extra brings each optional top-level module.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("mlx", "fastapi", "uvicorn", "yaml"), "server"),
    **dict.fromkeys(("pymunk", "gymnasium", "PIL"), "sim"),
    **dict.fromkeys(("zarr", "numcodecs", "tqdm"), "train"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        # A client-only install has numpy, pyzmq and msgpack: say what to install instead of a traceback.
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"dpmlx {args.command} needs {e.name}, which this install leaves out: "
            f"pip install 'diffusion-policy-mlx[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
