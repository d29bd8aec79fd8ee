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


def _bench_latency(args: argparse.Namespace) -> int:
    from clients.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmlx", description="Diffusion Policy on MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="MLX version, backend, device, memory and BLAS (for bug reports)")
    info.set_defaults(func=_info)

    serve = sub.add_parser("serve", help="serve a policy over ZeroMQ with an HTTP control plane")
    from server.cli import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

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
    return parser


SERVER_EXTRA_MODULES = {"mlx", "fastapi", "uvicorn", "yaml"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        # A client-only install has numpy, pyzmq and msgpack: say what to install instead of a traceback.
        if (e.name or "").split(".")[0] not in SERVER_EXTRA_MODULES:
            raise
        print(
            f"dpmlx {args.command} needs {e.name}, which the client-only install leaves out: "
            "pip install 'diffusion-policy-mlx[server]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
