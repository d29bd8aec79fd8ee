"""``dpmlx eval pusht``: closed-loop PushT evaluation through the server, the path a real robot uses.

Each episode runs ``PushTEnv`` under ``ActionChunkRunner`` with a ``PolicyClient``. Scoring as upstream:
an episode's score is its maximum reward, the result is the mean over episodes, and the success rate is
the share of episodes that reached coverage > 0.95. By default episodes run synchronously (each chunk is
awaited, n_action_steps actions per inference, as upstream's evaluation); ``--realtime`` runs the real
10 Hz loop with latency hiding instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.policy_client import PolicyClient
from clients.runner import ActionChunkRunner
from clients.sim.pusht import PushTEnv
from proto.latency import summarize


def _save_gif(frames: list[np.ndarray], path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    options = {k: v for k, v in (("num_inference_steps", args.steps), ("scheduler", args.scheduler)) if v}
    client = PolicyClient(args.server, timeout_s=args.timeout)
    schema, model = client.server_info["obs_schema"], client.server_info["model"]
    env = PushTEnv(obs_keys=tuple(schema), max_episode_steps=args.max_steps)
    if args.video:
        args.video.mkdir(parents=True, exist_ok=True)
    rows = []
    round_trip: list[float] = []
    gifs: list[Path] = []
    print(f"{model['name']} v{model['version']} on {args.server}: {args.episodes} episodes of up to "
          f"{args.max_steps} steps", flush=True)  # fmt: skip
    with client:
        for i in range(args.episodes):
            started = time.perf_counter()
            seed = args.start_seed + i
            frames: list[np.ndarray] = []
            record = args.video is not None and i < args.video_episodes
            on_step = (lambda *_, frames=frames: frames.append(env.render(256))) if record else None
            runner = ActionChunkRunner(
                client, env, realtime=args.realtime, infer_options=options, on_step=on_step,
                noise_seed=args.noise_seed,
            )  # fmt: skip
            result = runner.run_episode(seed=seed, max_steps=args.max_steps)
            success = any(info.get("is_success", False) for info in result.infos)
            rows.append(
                {"seed": seed, "max_reward": result.max_reward, "steps": result.steps, "success": success,
                 "starved_ticks": result.starved_ticks, "chunks": result.chunks}
            )  # fmt: skip
            round_trip += result.round_trip_ms
            print(f"episode {i + 1}/{args.episodes}  seed {seed}  max reward {result.max_reward:.3f}  "
                  f"steps {result.steps:3d}  {time.perf_counter() - started:5.1f} s"
                  f"{'  success' if success else ''}", flush=True)  # fmt: skip
            if record and frames:
                gifs.append(args.video / f"pusht_seed{seed}.gif")
                _save_gif(frames, gifs[-1], fps=env.metadata["render_fps"])
    scores = np.array([r["max_reward"] for r in rows])
    return {
        "server": args.server,
        "model": model,
        "episodes": len(rows),
        "start_seed": args.start_seed,
        "mean_score": float(scores.mean()) if len(rows) else 0.0,
        "success_rate": float(np.mean([r["success"] for r in rows])) if rows else 0.0,
        "realtime": args.realtime,
        "options": options,
        "noise_seed": args.noise_seed,
        "gifs": [str(g) for g in gifs],
        "round_trip_ms": summarize(round_trip),
        "round_trip_samples_ms": round_trip,
        "per_episode": rows,
    }


def main(args: argparse.Namespace) -> int:
    report = evaluate(args)
    print(
        f"\nPushT over {report['episodes']} episodes from seed {report['start_seed']}: "
        f"mean score {report['mean_score']:.3f}, success rate {report['success_rate']:.3f}"
    )
    latency = report["round_trip_ms"]
    if latency["n"]:
        print(
            f"chunk round trip over {latency['n']} requests: p50 {latency['p50']:.1f} ms, "
            f"p90 {latency['p90']:.1f} ms, p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms"
        )
    if report["gifs"]:
        print(f"GIFs in {args.video}/: {', '.join(Path(g).name for g in report['gifs'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    plot_folder = args.video or (args.json.parent if args.json else None)
    if latency["n"] and plot_folder is not None:
        from clients.bench import plot_cdf

        png = plot_folder / "latency.png"
        if plot_cdf({"chunk round trip": report["round_trip_samples_ms"]}, png):  # needs matplotlib
            print(f"latency plot (CDF of chunk round trips): {png}")
    return 0
