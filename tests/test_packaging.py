"""What the repository, the wheel and the source checkout's install carry."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_generated_folders_are_ignored_by_git():
    # dpmlx data / train / demo / bench write under data/ and runs/ of wherever they run.
    for path in ("data/pusht.zarr", "runs/demo/x.gif", "some/dir/runs/latency.json"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert result.returncode == 0, path


def _editable_install() -> bool:
    from importlib import metadata

    # Every match: the checkout's own *.egg-info (on sys.path as the current directory) has no direct_url.
    installs = metadata.distributions(name="diffusion-policy-mlx")
    urls = [json.loads(d.read_text("direct_url.json") or "{}") for d in installs]
    return any(u.get("dir_info", {}).get("editable", False) for u in urls)


@pytest.mark.skipif(not _editable_install(), reason="the project is not installed with pip install -e")
def test_the_editable_install_is_the_full_product_from_any_directory(tmp_path):
    # The wheel carries the client only; scripts/setup.sh's `pip install -e` puts the whole checkout on
    # sys.path, so the server, model, trainer and benchmarks work from any directory.
    code = (
        "import benchmarks.policy_latency, policy_core.config, server.cli, trainer.cli\n"
        "import clients, dpmlx, proto\n"
        "from server.models import SHIPPED_CHECKPOINT\n"
        "print(SHIPPED_CHECKPOINT.is_file(), server.cli.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found, path = result.stdout.split()
    assert found == "True" and Path(path).is_relative_to(ROOT)
    command = Path(sys.executable).parent / "dpmlx"
    for argv in (["serve", "--help"], ["train", "--help"], ["bench", "policy", "--help"]):
        result = subprocess.run([command, *argv], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and "not in this client-only install" not in result.stdout, argv
