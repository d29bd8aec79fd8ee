"""Our MLX policy against the same architecture in PyTorch, in one run: ``predict_action`` latency per
(config, sampler, dtype) and framework, a ratio table, JSON and a grouped bar chart (PNG).

Frameworks: ``mlx`` (our policy, built and fed exactly as benchmarks/policy_latency.py does, timed
until ``predict_action`` returns its NumPy actions), ``torch-eager`` and ``torch-compile`` (the PyTorch
baseline of benchmarks/torch_baseline.py; ``torch.compile(mode="reduce-overhead")`` of the per-step
denoiser on CUDA; on a CPU only with ``--torch-compile``, which tries the default mode and reports a
failure as skipped; their actions are timed on the device, synchronised, not copied to the host).
Weights are random (timing only); the observations have the same shapes and dtypes on both sides (uint8
images). Each PyTorch variant runs in its own subprocess with all CPU cores
as torch threads, never at the same time as MLX work: on a CPU the two thread pools fight (a 300x
slowdown was seen with both in one process). MLX uses its default device (the GPU on a CUDA build),
torch uses CUDA when available, with TF32 off so float32 is float32 on both.

    python -m benchmarks.compare_torch --configs lowdim,image --samplers ddim10,ddpm100 \
        --dtypes float32,bfloat16 --iters 20 --warmup 5 --json benchmarks/results/compare_torch.json \
        --png benchmarks/results/compare_torch.png

``MLX / best torch`` is MLX's p50 over the fastest PyTorch variant's p50 (below 1: MLX is faster).
``--rounds N`` runs the frameworks in turn N times (MLX, then each PyTorch variant, again and again): a
row's p50 is then the median of its rounds' p50s, and the ratio the median of the rounds' ratios, each
taken within one round, so that a machine whose speed drifts over minutes (a shared VM) weighs on both
sides alike.
``--set KEY=VALUE`` overrides a field of the ``policy:`` section for both frameworks (YAML value, dotted
keys for nested fields); the tests shrink the model with it
(``--set down_dims=[32,64] --set diffusion_step_embed_dim=32``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# float32 is float32 on both sides: MLX's CUDA backend would otherwise run fp32 matmuls and convs in TF32
# (torch's TF32 is turned off in its worker). Set before anything imports MLX.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from benchmarks import mlx_core, policy_latency  # noqa: E402
from benchmarks.policy_latency import CONFIGS, SAMPLERS  # noqa: E402
from policy_core.backends import cuda  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("mlx", "torch-eager", "torch-compile")
TORCH_MODES = {"torch-eager": "eager", "torch-compile": "compile"}


# ---- timing (shared with the torch worker) -------------------------------------------------------------


def time_requests(call: Callable[[int], Any], iters: int, warmup: int, max_seconds: float) -> list[float]:
    """``call(i)`` ``warmup`` times untimed, then up to ``iters`` times (stopping once ``max_seconds`` of
    timed calls have passed); returns the timed calls in ms. ``call`` must block until its work is done."""
    for i in range(warmup):
        call(i)
    times = []
    budget_end = time.perf_counter() + max_seconds
    for i in range(iters):
        start = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > budget_end:
            break
    return times


def summarize(times: list[float]) -> dict[str, float | int]:
    t = np.asarray(times, dtype=np.float64)
    return {
        "n": len(t),
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- configs ---------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
    return key.removeprefix("policy.").split("."), yaml.safe_load(value)


def config_file(name: str, overrides: list[tuple[list[str], Any]], tmpdir: Path) -> Path:
    """The config YAML both frameworks read: the named one, or a copy with the overrides applied."""
    path = ROOT / CONFIGS[name]
    if not overrides:
        return path
    doc = yaml.safe_load(path.read_text())
    section = copy.deepcopy(doc["policy"])
    for keys, value in overrides:
        node = section
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    out = tmpdir / f"{name}.yaml"
    out.write_text(yaml.safe_dump({"policy": section}, sort_keys=False))
    return out


@contextlib.contextmanager
def _registered(name: str, path: Path) -> Iterator[None]:
    """Let policy_latency._policy(name, ...) read ``path`` (it reads ``ROOT / CONFIGS[name]``)."""
    old = policy_latency.CONFIGS.get(name)
    policy_latency.CONFIGS[name] = str(path.resolve())
    try:
        yield
    finally:
        if old is None:
            del policy_latency.CONFIGS[name]
        else:
            policy_latency.CONFIGS[name] = old


# ---- the two sides ---------------------------------------------------------------------------------------


def mlx_environment() -> dict[str, Any]:
    mx = mlx_core()
    from policy_core.info import environment_report

    env: dict[str, Any] = {"mlx": mx.__version__, "cpu_model": cpu_model(), "report": environment_report()}
    with contextlib.suppress(Exception):
        env["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    return env


def _time_policy(policy, name: str, dtype: str, samplers: list[str], args: argparse.Namespace) -> list[dict]:
    obs = policy_latency._observation(policy, args.batch)
    rows = []
    for sampler_name in samplers:
        kind, steps = SAMPLERS[sampler_name]

        def call(i: int, kind=kind, steps=steps) -> None:
            policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=i)  # NumPy: evaluated

        row = {
            "config": name,
            "sampler": sampler_name,
            "dtype": dtype,
            "framework": "mlx",
            "batch": args.batch,
        }
        row.update(summarize(time_requests(call, args.iters, args.warmup, args.max_seconds)))
        _print_progress(row)
        rows.append(row)
    return rows


def time_mlx(name: str, path: Path, dtype: str, samplers: list[str], args: argparse.Namespace) -> list[dict]:
    """Our policy, built as benchmarks/policy_latency.py builds it, from the config at ``path``."""
    mx = mlx_core()
    with _registered(name, path):
        policy = policy_latency._policy(name, dtype)
    rows = _time_policy(policy, name, dtype, samplers, args)
    del policy
    gc.collect()
    mx.clear_cache()  # give the device memory back before torch runs
    return rows


def time_torch(
    name: str,
    path: Path,
    dtype: str,
    framework: str,
    samplers: list[str],
    args: argparse.Namespace,
    tmpdir: Path,
) -> tuple[list[dict], dict[str, Any]]:
    """Run one PyTorch variant in a subprocess (benchmarks.torch_baseline); its rows and environment."""
    out = tmpdir / f"{name}-{dtype}-{framework}.json"
    cmd = [
        sys.executable, "-m", "benchmarks.torch_baseline", "--config", str(path), "--name", name,
        "--samplers", ",".join(samplers), "--dtype", dtype, "--mode", TORCH_MODES[framework],
        "--iters", str(args.iters), "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds),
        "--batch", str(args.batch), "--json", str(out),
    ]  # fmt: skip
    if args.torch_compile:
        cmd.append("--allow-cpu-compile")
    if args.torch_device:
        cmd += ["--device", args.torch_device]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.worker_timeout)
        failure = f"torch worker exited with status {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        failure = f"torch worker timed out after {args.worker_timeout} s"
    if failure is None and out.exists():
        report = json.loads(out.read_text())
        return report["rows"], report["environment"]
    failure = failure or "torch worker wrote no results"
    print(f"[{framework}] {failure} (its output is above)", flush=True)
    rows = [{"config": name, "sampler": s, "dtype": dtype, "framework": framework, "batch": args.batch,
             "skipped": failure} for s in samplers]  # fmt: skip
    return rows, {}


def _print_progress(row: dict) -> None:
    print(
        f"[{row['framework']}] {row['config']:7s} {row['dtype']:9s} {row['sampler']:8s} "
        f"B={row['batch']:<3d} n={row['n']:<4d} p50 {row['p50_ms']:9.2f} ms   p99 {row['p99_ms']:9.2f} ms",
        flush=True,
    )


# ---- report ----------------------------------------------------------------------------------------------


def _groups(rows: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[f] for f in fields), []).append(r)
    return groups


def combine_rounds(round_rows: list[dict]) -> list[dict]:
    """One row per (config, sampler, dtype, framework): the median of its rounds' p50 and p99, all their
    timed requests counted, each round's p50 kept; a framework skipped in every round stays skipped."""
    out = []
    for group in _groups(round_rows, "config", "sampler", "dtype", "framework").values():
        timed = [r for r in group if "p50_ms" in r]
        if not timed:
            out.append({k: v for k, v in group[0].items() if k != "round"})
            continue
        row = {k: v for k, v in timed[0].items() if k not in ("round", "p50_ms", "p99_ms", "mean_ms", "n")}
        row.update({
            "n": sum(r["n"] for r in timed),
            "p50_ms": float(np.median([r["p50_ms"] for r in timed])),
            "p99_ms": float(np.median([r["p99_ms"] for r in timed])),
            "mean_ms": float(np.mean([r["mean_ms"] for r in timed])),
            "round_p50_ms": [r["p50_ms"] for r in timed],
        })  # fmt: skip
        out.append(row)
    return out


def ratios(round_rows: list[dict]) -> list[dict]:
    """MLX p50 / fastest torch p50 per (config, sampler, dtype) where both ran, taken within each round;
    the median over rounds, with each round's."""
    out = []
    for (config, sampler, dtype), group in _groups(round_rows, "config", "sampler", "dtype").items():
        per_round = []
        for rows in _groups(group, "round").values():
            mlx = [r for r in rows if r["framework"] == "mlx" and "p50_ms" in r]
            torch_rows = [r for r in rows if r["framework"] != "mlx" and "p50_ms" in r]
            if mlx and torch_rows:
                per_round.append((mlx[0], min(torch_rows, key=lambda r: r["p50_ms"])))
        if not per_round:
            continue
        round_ratios = [m["p50_ms"] / t["p50_ms"] for m, t in per_round]
        best = Counter(t["framework"] for _, t in per_round).most_common(1)[0][0]
        out.append({
            "config": config, "sampler": sampler, "dtype": dtype,
            "mlx_p50_ms": float(np.median([m["p50_ms"] for m, _ in per_round])),
            "best_torch": best,
            "best_torch_p50_ms": float(np.median([t["p50_ms"] for _, t in per_round])),
            "mlx_over_best_torch": float(np.median(round_ratios)),
            "round_ratios": round_ratios,
        })  # fmt: skip
    return out


def format_table(rows: list[dict], ratio_rows: list[dict]) -> str:
    by_group = {(r["config"], r["sampler"], r["dtype"]): r for r in ratio_rows}
    head = (
        f"{'config':8s} {'sampler':8s} {'dtype':9s} {'framework':14s} {'p50 ms':>10s} {'p99 ms':>10s} "
        f"{'n':>4s}  MLX / best torch"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        prefix = f"{r['config']:8s} {r['sampler']:8s} {r['dtype']:9s} {r['framework']:14s}"
        if "p50_ms" not in r:
            lines.append(f"{prefix} skipped: {r.get('skipped', '?')}")
            continue
        ratio = ""
        group = by_group.get((r["config"], r["sampler"], r["dtype"]))
        if r["framework"] == "mlx" and group:
            ratio = f"{group['mlx_over_best_torch']:.2f}x (vs {group['best_torch']})"
            if len(group["round_ratios"]) > 1:
                ratio += " rounds " + " ".join(f"{x:.2f}" for x in group["round_ratios"])
        lines.append(f"{prefix} {r['p50_ms']:10.2f} {r['p99_ms']:10.2f} {r['n']:4d}  {ratio}".rstrip())
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Grouped bars of p50 per framework; False (and a message) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "p50_ms" in r]
    groups = list(dict.fromkeys((r["config"], r["sampler"], r["dtype"]) for r in done))
    frameworks = [f for f in FRAMEWORKS if any(r["framework"] == f for r in done)]
    width = 0.8 / max(len(frameworks), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(len(frameworks), 1) / 2 + 2), 4.5))
    for j, fw in enumerate(frameworks):
        xs, ys = [], []
        for i, g in enumerate(groups):
            match = [r for r in done if (r["config"], r["sampler"], r["dtype"]) == g and r["framework"] == fw]
            if match:
                xs.append(i + (j - (len(frameworks) - 1) / 2) * width)
                ys.append(match[0]["p50_ms"])
        bars = ax.bar(xs, ys, width, label=fw)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), ["\n".join(g) for g in groups])
    values = [r["p50_ms"] for r in done]
    if values and max(values) / max(min(values), 1e-9) > 30:
        ax.set_yscale("log")
    ax.set_ylabel("predict_action p50 (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    configs, samplers = args.configs.split(","), args.samplers.split(",")
    dtypes, frameworks = args.dtypes.split(","), args.frameworks.split(",")
    for values, known, what in (
        (configs, CONFIGS, "config"), (samplers, SAMPLERS, "sampler"), (frameworks, FRAMEWORKS, "framework"),
    ):  # fmt: skip
        unknown = [v for v in values if v not in known]
        if unknown:
            raise SystemExit(f"unknown {what}(s) {unknown}; choose from {sorted(known)}")
    overrides = [parse_override(item) for item in args.set]
    cuda.use_direct_launches()  # as the server does
    round_rows: list[dict] = []
    torch_env: dict[str, Any] = {}
    mlx_env = mlx_environment() if "mlx" in frameworks else {}
    with tempfile.TemporaryDirectory(prefix="compare_torch_") as tmp:
        tmpdir = Path(tmp)
        for name in configs:
            path = config_file(name, overrides, tmpdir)
            for dtype, round_index in ((d, i) for d in dtypes for i in range(args.rounds)):
                rows: list[dict] = []
                if "mlx" in frameworks:
                    rows += time_mlx(name, path, dtype, samplers, args)
                for fw in (f for f in FRAMEWORKS[1:] if f in frameworks):
                    cpu_torch = torch_env.get("torch_device") == "cpu"
                    if fw == "torch-compile" and cpu_torch and not args.torch_compile:
                        # Known from the eager worker: no need to start one only to hear it skip.
                        reason = "torch.compile runs on CUDA only unless --torch-compile is given"
                        print(f"[{fw}] skipped: {reason}", flush=True)
                        rows += [{"config": name, "sampler": s, "dtype": dtype, "framework": fw,
                                  "batch": args.batch, "skipped": reason} for s in samplers]  # fmt: skip
                        continue
                    new_rows, env = time_torch(name, path, dtype, fw, samplers, args, tmpdir)
                    rows += new_rows
                    torch_env = torch_env or env
                round_rows += [{**r, "round": round_index} for r in rows]
    rows = combine_rounds(round_rows)
    order = {f: i for i, f in enumerate(FRAMEWORKS)}
    rows.sort(key=lambda r: (configs.index(r["config"]), samplers.index(r["sampler"]),
                             dtypes.index(r["dtype"]), order[r["framework"]]))  # fmt: skip
    ratio_rows = ratios(round_rows)
    devices = {
        "mlx": mlx_env.get("report", {}).get("device", "-"),
        "mlx_device_name": mlx_env.get("device_info", {}).get("device_name", mlx_env.get("cpu_model", "-")),
        "torch": torch_env.get("torch_device", "-"),
        "torch_device_name": torch_env.get("torch_device_name", "-"),
    }
    report = {
        "command": " ".join(["python -m benchmarks.compare_torch", *getattr(args, "argv", [])]),
        "settings": {
            "iters": args.iters,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "batch": args.batch,
            "rounds": args.rounds,
            "overrides": args.set,
            "torch_cpu_compile": args.torch_compile,
        },  # fmt: skip
        "devices": devices,
        "environment": {
            "cpu_model": cpu_model(),
            "mlx_version": mlx_env.get("mlx"),
            "mlx": mlx_env,
            "torch_version": torch_env.get("torch"),
            "torch": torch_env,
            "tf32": {
                "cuda_matmul_allow_tf32": torch_env.get("cuda_matmul_allow_tf32"),
                "cudnn_allow_tf32": torch_env.get("cudnn_allow_tf32"),
            },
        },
        "rows": rows,
        "ratios": ratio_rows,
        "round_rows": round_rows,
    }
    print()
    print(
        f"MLX {mlx_env.get('mlx', '-')} on {devices['mlx']} ({devices['mlx_device_name']}); "
        f"torch {torch_env.get('torch', '-')} on {devices['torch']} ({devices['torch_device_name']}), "
        f"TF32 off for matmul and cuDNN; batch {args.batch}"
    )
    print(format_table(rows, ratio_rows))
    print("MLX / best torch: MLX p50 over the fastest PyTorch variant's p50 (< 1: MLX faster)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.png is not None:
        title = (
            f"predict_action p50, batch {args.batch}\nMLX {mlx_env.get('mlx', '-')} on {devices['mlx']} "
            f"({devices['mlx_device_name']})\ntorch {torch_env.get('torch', '-')} on {devices['torch']} "
            f"({devices['torch_device_name']}), TF32 off"
        )
        if plot(rows, args.png, title):
            print(f"wrote {args.png}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="lowdim", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--samplers", default="ddim10", help=f"comma list of {sorted(SAMPLERS)}")
    parser.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma list of {FRAMEWORKS}")
    parser.add_argument("--iters", type=int, default=20, help="timed requests per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per row (compilation)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap on timed seconds per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the frameworks in turn this many times (median of rounds)"
    )
    parser.add_argument("--json", type=Path, default=Path("runs/compare_torch.json"))
    parser.add_argument("--png", type=Path, default=Path("runs/compare_torch.png"))
    parser.add_argument(
        "--torch-compile", action="store_true", help="on a CPU, try torch.compile (default mode) too"
    )
    parser.add_argument("--torch-device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per torch subprocess")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a policy config field for both frameworks, e.g. down_dims=[32,64]",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
