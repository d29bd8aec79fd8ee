import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPMLX = [sys.executable, str(ROOT / "dpmlx.py")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DPMLX, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_info_reports_backend_memory_and_blas():
    result = run("info")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert fields["backend"] in {"CPU", "Metal", "CUDA"}
    assert fields["mlx"][0].isdigit()
    assert fields["memory_limit"].endswith("GiB")
    assert "cpu_blas" in fields


def test_bench_policy_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "policy", "--configs", "lowdim", "--samplers", "ddim10", "--iters", "2",
                 "--warmup", "1", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["config"] == "lowdim" and row["sampler"] == "ddim10" and row["n"] == 2
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert report["environment"]["backend"] in {"CPU", "Metal", "CUDA"}
