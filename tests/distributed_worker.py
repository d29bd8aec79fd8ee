"""Run by the data-parallel test under `mlx.launch` (and once alone): train K steps, save the weights.

usage: distributed_worker.py CONFIG_JSON OUT_DIR STEPS
"""

import json
import sys
from pathlib import Path

import mlx.core as mx  # noqa: I001
import numpy as np
from mlx.utils import tree_flatten

import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
from trainer.train import Trainer

config = json.loads(Path(sys.argv[1]).read_text())
out, steps = Path(sys.argv[2]), int(sys.argv[3])
group = mx.distributed.init()
rank, size = group.rank(), group.size()
trainer = Trainer(config, out / f"run{size}", group=group if size > 1 else None)
if size == 1:
    np.savez(
        out / "weights_init.npz", **{k: np.array(v) for k, v in tree_flatten(trainer.policy.parameters())}
    )
trainer.run(steps, progress=False)
weights = {k: np.array(v) for k, v in tree_flatten(trainer.policy.parameters())}
np.savez(out / f"weights_{size}proc_rank{rank}.npz", **weights)
