"""What the repository, the wheel and the source checkout's install carry."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_generated_folders_are_ignored_by_git():
    # dpmlx data / train / demo / bench write under data/ and runs/ of wherever they run.
    for path in ("data/pusht.zarr", "runs/demo/x.gif", "some/dir/runs/latency.json"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert result.returncode == 0, path
