"""benchmarks/compare_torch.py: the MLX-vs-PyTorch latency comparison runs end to end (on a tiny model),
and its PyTorch baseline computes what our policy computes: for the same weights, observation and noise,
``TorchPolicy``'s denoiser output (UNet or transformer), conditioning and DDIM / DDPM action chunks equal
ours within 1e-4 relative error (fp32). PyTorch is an optional test dependency: these tests skip without it.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch", reason="the comparison's baseline is a PyTorch model")

from benchmarks import compare_torch, policy_latency  # noqa: E402
from policy_core.convert.common import (  # noqa: E402
    load_weights,
    rename,
    resnet_rules,
    transformer_rules,
    unet_rules,
)

TOL = 1e-4
TINY = ["down_dims=[32,64]", "diffusion_step_embed_dim=32"]  # horizon 16, kernel 5, 8 groups as shipped
TINY_TRANSFORMER = ["n_layer=2", "n_emb=32", "n_head=2"]  # horizon 10, causal, MLP memory as the configs


def _tiny(name: str) -> list[str]:
    return TINY_TRANSFORMER if name.startswith("transformer") else TINY


@pytest.fixture(scope="module")
def torch():
    import torch

    # Tiny models in the test process: one thread, or torch's workers fight MLX's BLAS threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_compare_torch_tiny_lowdim(tmp_path):
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    argv = ["--configs", "lowdim", "--samplers", "ddim10", "--dtypes", "float32", "--iters", "2"]
    argv += ["--warmup", "1", "--json", str(out), "--png", str(png)]
    for item in TINY:
        argv += ["--set", item]
    assert compare_torch.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["framework"]: r for r in report["rows"]}
    assert set(rows) == set(compare_torch.FRAMEWORKS)
    timed = [fw for fw, r in rows.items() if "p50_ms" in r]
    assert {"mlx", "torch-eager"} <= set(timed)
    for fw in timed:
        r = rows[fw]
        assert (r["config"], r["sampler"], r["dtype"], r["n"]) == ("lowdim", "ddim10", "float32", 2)
        assert 0 < r["p50_ms"] <= r["p99_ms"], r
    if report["devices"]["torch"] == "cpu":  # torch.compile is CUDA-only unless --torch-compile
        assert "CUDA only" in rows["torch-compile"]["skipped"]
    [ratio] = report["ratios"]
    assert ratio["best_torch"] in timed and ratio["mlx_over_best_torch"] > 0
    best = min(rows[fw]["p50_ms"] for fw in timed if fw != "mlx")
    assert ratio["mlx_over_best_torch"] == pytest.approx(rows["mlx"]["p50_ms"] / best)
    env = report["environment"]
    assert env["mlx_version"] == mx.__version__ and env["torch_version"]
    assert env["tf32"] == {"cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False}
    assert report["devices"]["torch_device_name"] not in ("", "-")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_give_medians_and_ratios_taken_within_each_round():
    """A machine twice as slow in the second round: each round's ratio is the same, and the median of
    the rounds' ratios keeps it, where the ratio of the medians of separate rounds would not."""

    def row(framework, p50, round_index):
        group = {"config": "lowdim", "sampler": "ddim10", "dtype": "float32", "batch": 1}
        return {**group, "framework": framework, "n": 10, "p50_ms": p50, "p99_ms": p50 * 1.1, "mean_ms": p50,
                "round": round_index}  # fmt: skip

    skipped = {"config": "lowdim", "sampler": "ddim10", "dtype": "float32", "framework": "torch-compile",
               "batch": 1, "skipped": "CUDA only"}  # fmt: skip
    round_rows = [row("mlx", 100, 0), row("torch-eager", 400, 0), {**skipped, "round": 0}]
    round_rows += [row("mlx", 200, 1), row("torch-eager", 800, 1), {**skipped, "round": 1}]
    round_rows += [row("mlx", 130, 2), row("torch-eager", 520, 2), {**skipped, "round": 2}]
    rows = {r["framework"]: r for r in compare_torch.combine_rounds(round_rows)}
    assert rows["mlx"]["p50_ms"] == 130 and rows["mlx"]["round_p50_ms"] == [100, 200, 130]
    assert rows["torch-eager"]["p50_ms"] == 520 and rows["torch-eager"]["n"] == 30
    assert rows["torch-compile"]["skipped"] == "CUDA only" and "round" not in rows["torch-compile"]
    [ratio] = compare_torch.ratios(round_rows)
    assert ratio["round_ratios"] == [0.25, 0.25, 0.25] and ratio["mlx_over_best_torch"] == 0.25
    assert ratio["best_torch"] == "torch-eager"


def test_compare_torch_rounds_run_mlx_again(tmp_path):
    out = tmp_path / "compare.json"
    argv = ["--configs", "lowdim", "--samplers", "ddim10", "--frameworks", "mlx", "--rounds", "2"]
    argv += ["--iters", "2", "--warmup", "1", "--json", str(out), "--png", str(tmp_path / "c.png")]
    for item in TINY:
        argv += ["--set", item]
    assert compare_torch.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["round"] for r in report["round_rows"]] == [0, 1]
    [row] = report["rows"]
    assert row["n"] == 4 and len(row["round_p50_ms"]) == 2
    assert row["p50_ms"] == pytest.approx(float(np.median(row["round_p50_ms"])))
    assert report["settings"]["rounds"] == 2 and report["ratios"] == []


def _pair(torch, name: str, tmp_path):
    """Our policy (as the benchmark builds it, tiny UNet) and a TorchPolicy with the same weights and
    normalizer: random torch weights (non-trivial norm affines) copied into ours by the converter."""
    import convert_reference as ref

    from benchmarks.torch_baseline import TorchPolicy, load_policy_section

    path = compare_torch.config_file(name, [compare_torch.parse_override(s) for s in _tiny(name)], tmp_path)
    with compare_torch._registered(name, path):
        policy = policy_latency._policy(name, "float32")
    normalizer = {k: (f.scale, f.offset) for k, f in policy.normalizer.features.items()}
    theirs = TorchPolicy(load_policy_section(path), normalizer=normalizer)
    ref.randomize(theirs, seed=3)
    if theirs.is_transformer:
        rules, ignore = (
            transformer_rules("transformer."),
            [r"transformer\.(_dummy_variable|mask|memory_mask)"],
        )
    else:
        rules, ignore = unet_rules("unet.", lerobot=False), []
    for key in policy.config.image_keys:
        p = f"encoders\\.{key}\\."
        rules += resnet_rules(f"encoders.{key}.backbone.nets.", key)
        rules += [
            (rf"{p}pool\.nets\.(weight|bias)", rf"rgb_encoders.{key}.spatial_softmax.conv.\1"),
            (rf"{p}nets\.3\.(weight|bias)", rf"rgb_encoders.{key}.out.\1"),
        ]
        ignore += [rf"{p}nets\.[01]\..*", rf"{p}pool\.(pos_x|pos_y|temperature)"]
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    load_weights(policy, rename(state, rules, ignore, "torch baseline")[0], "torch baseline")
    return policy, theirs


@pytest.mark.parametrize("name", ["lowdim", "image", "transformer_lowdim", "transformer_image"])
def test_torch_baseline_matches_mlx(name, torch, tmp_path):
    from convert_reference import rel_err

    policy, theirs = _pair(torch, name, tmp_path)
    obs = policy_latency._observation(policy, batch=2)
    rng = np.random.default_rng(5)
    cfg = policy.config
    x_t = rng.standard_normal((2, cfg.horizon, cfg.action_dim)).astype(np.float32)
    errors = {}
    gc = policy.encode_obs(policy.normalize_obs(obs))
    net = theirs.transformer if theirs.is_transformer else theirs.unet
    with torch.inference_mode():
        gc_theirs = theirs.condition(obs)
        errors["cond"] = rel_err(gc, gc_theirs.numpy())
        errors["denoiser"] = max(
            rel_err(
                policy.network(mx.array(x_t), mx.full((2,), t), gc),
                net(torch.from_numpy(x_t), torch.full((2,), t), gc_theirs).numpy(),
            )
            for t in (0, 37, 99)
        )
    for kind in ("ddim", "ddpm"):
        steps = 10
        step_noise = rng.standard_normal((steps, *x_t.shape)).astype(np.float32)
        kw = {"scheduler": kind, "num_inference_steps": steps, "noise": x_t, "step_noise": step_noise}
        ours, want = policy.predict_action(obs, **kw), theirs.predict_action(obs, **kw)
        errors[f"{kind}_action_pred"] = rel_err(ours["action_pred"], want["action_pred"].numpy())
        errors[f"{kind}_action"] = rel_err(ours["action"], want["action"].numpy())
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL, errors
