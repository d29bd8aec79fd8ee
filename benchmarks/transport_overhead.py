"""Transport overhead of the server: client round trip minus the server's own ``server_ms``.

Starts ``dpmlx serve`` as a separate process on a random-weight policy with the PushT lowdim UNet and an
observation of two 96x96x3 uint8 images (n_obs_steps = 2) plus a 2-d state, then times N sequential
requests from a DEALER client. The overhead (encode, ZeroMQ both ways, decode, validation, hand-off to
the worker and back) does not depend on the model; 1-step DDIM keeps the run short.

    python -m benchmarks.transport_overhead --requests 300 --json benchmarks/results/transport_cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path) -> None:
    import numpy as np
    import yaml

    from policy_core import build_policy, save_policy
    from policy_core.normalizer import LinearNormalizer, fit_limits, image_range

    section = yaml.safe_load((ROOT / "configs/pusht_lowdim.yaml").read_text())["policy"]
    section["shape_meta"]["obs"] = {
        "image": {"shape": [3, 96, 96], "type": "rgb"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    }
    rng = np.random.default_rng(0)
    normalizer = LinearNormalizer(
        {
            "image": image_range(3),
            "agent_pos": fit_limits(rng.uniform(0, 512, (100, 2))),
            "action": fit_limits(rng.uniform(0, 512, (100, 2))),
        }
    )
    save_policy(build_policy(section, normalizer), path, provenance={"name": "transport-bench"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--zmq", default="tcp://127.0.0.1:5599")
    parser.add_argument("--json", type=Path, default=Path("runs/transport_overhead.json"))
    args = parser.parse_args()

    import numpy as np
    import zmq

    from proto.codec import pack, unpack

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "policy.safetensors"
        make_checkpoint(ckpt)
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dpmlx.py"), "serve", "--checkpoint", str(ckpt), "--zmq", args.zmq,
             "--http", "127.0.0.1:0"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for line in proc.stderr:
                if re.search(r"serving .* v1", line):
                    break
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVTIMEO, 60_000)
            sock.connect(args.zmq)
            sock.send(pack({"type": "hello", "id": 0}))
            schema = unpack(sock.recv())["obs_schema"]
            rng = np.random.default_rng(0)
            obs = {
                k: rng.integers(0, 256, s["shape"], dtype=np.uint8)
                if s["dtype"] == "uint8"
                else rng.uniform(0, 512, s["shape"]).astype(np.float32)
                for k, s in schema.items()
            }
            options = {"scheduler": "ddim", "num_inference_steps": 1}
            payload_bytes = len(pack({"type": "infer", "id": 0, "obs": obs, "options": options}))
            rows = []
            for i in range(args.warmup + args.requests):
                start = time.perf_counter()
                sock.send(pack({"type": "infer", "id": i, "obs": obs, "options": options}))
                reply = unpack(sock.recv())
                round_trip = (time.perf_counter() - start) * 1e3
                if i >= args.warmup:
                    rows.append((round_trip, reply["timing"]["server_ms"]))
            sock.close()
        finally:
            proc.terminate()
            proc.wait(30)
    rt, server = np.array(rows).T
    overhead = rt - server
    report = {
        "payload_bytes": payload_bytes,
        "requests": len(rows),
        "round_trip_ms": {"p50": float(np.median(rt)), "p99": float(np.percentile(rt, 99))},
        "server_ms": {"p50": float(np.median(server)), "p99": float(np.percentile(server, 99))},
        "overhead_ms": {"p50": float(np.median(overhead)), "p99": float(np.percentile(overhead, 99))},
    }
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
