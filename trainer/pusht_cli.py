"""Arguments of ``dpmlx data pusht`` (argparse only, so building the CLI stays cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=int, required=True, help="successful demonstrations to write")
    parser.add_argument("--out", type=Path, required=True, help="output .zarr folder")
    parser.add_argument("--seed", type=int, default=0, help="first environment seed (then seed+1, ...)")
    parser.add_argument("--with-images", action="store_true", help="also render data/img (96x96x3)")
