"""The persistent CUDA sampler: its recorded program (on any machine) and its kernel (on a GPU).

The program is checked on CPU by a numpy interpreter that does what the kernel does phase by phase (the
same index arithmetic for strided and transposed convolutions, GroupNorm from the producers' per-row
statistics, the scheduler update in the last phase), against ``forward_film`` and ``update``. The kernel
itself is checked on a GPU against the chunked sampler, and every sampler test of test_policy.py goes
through it there.
"""

import dataclasses
import warnings

import mlx.core as mx
import numpy as np
import pytest
from helpers import observation, tiny_policy
from mlx.utils import tree_flatten, tree_map

from policy_core import build_policy
from policy_core.backends import cuda
from policy_core.backends.cuda import device
from policy_core.backends.cuda import sampler as cuda_sampler
from policy_core.backends.cuda.sampler import (
    HEADER_FIELDS,
    ROWSET_FIELDS,
    RS0,
    SOURCE_FIELDS,
    SRC0,
    _params,
    _Program,
)
from policy_core.nets.unet import ConditionalUnet1D
from policy_core.schedulers import ConsistencyConfig, SchedulerConfig, make_scheduler


def _mish(v: np.ndarray) -> np.ndarray:
    return v * np.tanh(np.log1p(np.exp(np.minimum(v, 20.0))))


def _fields(record: list[int], start: int, names: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(names, record[start : start + len(names)], strict=True))


def _interpret(
    program: _Program, variants: dict[int, tuple], x, films, coeffs, noise, scheduler
) -> np.ndarray:
    """One denoising step as the kernel runs it: x (B, T, A) -> x_prev."""
    batch = program.batch
    ws = np.zeros(program.ws_size, np.float64)
    ws[: x.size] = x.ravel()
    params = [np.array(a, np.float64) for a in _params(program)]

    def view(slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return ws[slot : slot + int(np.prod(shape))].reshape(shape)

    for record in program.records:
        header = _fields(record, 0, HEADER_FIELDS)
        length, parts = header["LEN"], []
        for i in range(header["NSRC"]):
            src = _fields(record, SRC0 + i * len(SOURCE_FIELDS), SOURCE_FIELDS)
            ch = src["CH"]
            v = view(src["SLOT"], (batch, length, ch)).copy()
            if src["NORMED"]:
                groups, cg = src["GROUPS"], ch // src["GROUPS"]
                rows = view(src["ROW_STATS"], (batch, ch, 2)).reshape(batch, groups, cg, 2)
                mean = rows[..., 0].mean(-1)  # (B, G): Chan's combination of the rows' (mean, M2)
                m2 = rows[..., 1].sum(-1) + length * ((rows[..., 0] - mean[..., None]) ** 2).sum(-1)
                eps = np.array(src["EPS"], np.int32).view(np.float32)
                rstd = 1.0 / np.sqrt(m2 / (cg * length) + eps)
                v = (v - np.repeat(mean, cg, -1)[:, None]) * np.repeat(rstd, cg, -1)[:, None]
                v = _mish(v * params[src["GAMMA"]] + params[src["BETA"]])
                film = films[:, src["FILM_OFF"] :]
                if src["FILM_MODE"] == 1:
                    v = v * film[:, None, :ch] + film[:, None, ch : 2 * ch]
                elif src["FILM_MODE"] == 2:
                    v = v + film[:, None, :ch]
                if src["RES"] >= 0:
                    v = v + view(src["RES"], (batch, length, ch))
                if src["MAT"] >= 0:
                    view(src["MAT"], (batch, length, ch))[:] = v
            parts.append(v)
        staged = np.concatenate(parts, -1)
        for r in range(header["NROWSETS"]):
            rs = _fields(record, RS0 + r * len(ROWSET_FIELDS), ROWSET_FIELDS)
            taps, stride, pad, transposed, _ = variants[rs["VARIANT"]]
            weight, lout = params[rs["W"]], rs["OUT_LEN"]
            out = np.broadcast_to(params[rs["B"]], (batch, lout, rs["OUT"])).copy()
            for m in range(length):
                for j in range(taps):
                    if transposed:
                        t = m * stride + j - pad
                    elif (m - j + pad) % stride == 0:
                        t = (m - j + pad) // stride
                    else:
                        continue
                    if 0 <= t < lout:
                        out[:, t] += staged[:, m] @ weight[:, j].T
            if rs["EPILOGUE"]:
                prev = scheduler.update(mx.array(out, mx.float32), mx.array(x), coeffs, mx.array(noise))
                view(rs["OUT_SLOT"], out.shape)[:] = np.array(prev)
                continue
            view(rs["OUT_SLOT"], out.shape)[:] = out
            row_mean = out.mean(1)
            stats = np.stack([row_mean, ((out - row_mean[:, None]) ** 2).sum(1)], -1)
            view(rs["STATS_SLOT"], (batch, rs["OUT"], 2))[:] = stats
    return view(0, x.shape).copy()


@pytest.mark.parametrize(
    "scale, batch, horizon, action_dim, dims, kind, scheduler",
    [
        (True, 1, 16, 3, (16, 32, 64), "ddim", {}),
        (False, 2, 8, 3, (16, 32, 64), "ddpm", {"prediction_type": "sample"}),
        (True, 3, 12, 3, (16, 32, 64), "ddim", {"eta": 0.5, "clip_sample": False}),
        (True, 1, 10, 7, (16, 32), "ddpm", {}),  # slots of odd sizes
    ],
)
def test_recorded_program_computes_one_denoising_step(
    scale, batch, horizon, action_dim, dims, kind, scheduler
):
    unet = ConditionalUnet1D(action_dim, 12, 32, dims, kernel_size=5, n_groups=4, cond_predict_scale=scale)
    program = _Program(unet, batch, horizon)
    # The kernel moves workspace data 4 floats at a time: every slot starts on 16 bytes.
    for record in program.records:
        for i in range(2):
            src = _fields(record, SRC0 + i * len(SOURCE_FIELDS), SOURCE_FIELDS)
            assert all(src[k] % 4 == 0 for k in ("SLOT", "ROW_STATS", "RES", "MAT") if src[k] >= 0)
            rs = _fields(record, RS0 + i * len(ROWSET_FIELDS), ROWSET_FIELDS)
            assert rs["OUT_SLOT"] % 4 == 0 and rs["STATS_SLOT"] % 4 == 0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, horizon, action_dim)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    films = [
        rng.normal(size=(batch, blk.cond_encoder.weight.shape[0])).astype(np.float32)
        for blk in unet.residual_blocks()
    ]
    sched = make_scheduler(kind, SchedulerConfig(**scheduler))
    sched.set_timesteps(10)
    coeffs = tuple(sched.coefficient_table()[3])
    variants = {index: variant for variant, index in program.variants.items()}
    out = _interpret(program, variants, x, np.concatenate(films, -1), coeffs, noise, sched)
    eps = unet.forward_film(mx.array(x), [mx.array(f) for f in films])
    ref = np.array(sched.update(eps, mx.array(x), coeffs, mx.array(noise)))
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # The kernel's inputs are exactly the trunk's parameters (the FiLM projections run before it).
    trunk = {
        id(p)
        for name, p in tree_flatten(unet.parameters())
        if "cond_encoder" not in name and "diffusion_step_encoder" not in name
    }
    assert {id(a) for a in _params(program)} == trunk
    assert len(program.refs) == len(trunk)


def test_which_shapes_the_kernel_takes():
    # The PushT UNets (lazy random weights: nothing is computed).
    image = cuda_sampler.CudaSampler(ConditionalUnet1D(2, 132, 256, (512, 1024, 2048), 5, 8, True))
    lowdim = cuda_sampler.CudaSampler(ConditionalUnet1D(2, 40, 256, (256, 512, 1024), 5, 8, True))
    h100, l4 = 227 * 1024 - 1024, 99 * 1024 - 1024
    assert all(image.fits(batch, 16, h100) for batch in (1, 2, 3))
    assert not image.fits(4, 16, h100)  # 64 KB of staged input per sample
    assert image.fits(1, 16, l4) and not image.fits(2, 16, l4)
    assert lowdim.fits(4, 16, h100) and not lowdim.fits(5, 16, h100)  # one accumulator per column and lane
    if not cuda.available():
        assert not image.supports(1, 16, make_scheduler("ddim", SchedulerConfig()))


def test_the_kernel_takes_one_weight_dtype_and_sees_weights_replaced():
    unet = ConditionalUnet1D(2, 40, 64, (32, 64), 5, 8, True)
    sampler = cuda_sampler.CudaSampler(unet)
    h100 = 227 * 1024 - 1024
    assert sampler.fits(1, 16, h100)
    unet.final_conv[1].weight = unet.final_conv[1].weight.astype(mx.bfloat16)  # one array: mixed dtypes
    assert not sampler.fits(1, 16, h100)
    program, _ = sampler._program(1, 16)
    with pytest.raises(ValueError, match="one dtype"):  # never packed into one array of a promoted type
        sampler._weights(program, _params(program))
    unet.set_dtype(mx.bfloat16)
    assert sampler.fits(1, 16, h100)


def test_the_weights_go_to_the_kernel_as_one_array_that_the_modules_then_view(tmp_path):
    mx.random.seed(0)
    unet = ConditionalUnet1D(2, 40, 64, (32, 64), 5, 8, True)
    sampler = cuda_sampler.CudaSampler(unet)
    program, _ = sampler._program(1, 16)
    assert all(offset % 8 == 0 for offset in program.offsets)  # 16 bytes for any dtype: rows' vector loads
    assert f"params[1] = weights + {program.offsets[1]};" in cuda_sampler._body(program)
    params = [mx.array(a) for a in _params(program)]  # copies: the values to expect
    packed = sampler._weights(program, _params(program))
    for a, view, offset in zip(params, _params(program), program.offsets, strict=True):
        assert mx.array_equal(view, a)
        assert mx.array_equal(packed[offset : offset + a.size], a.reshape(-1))
    assert sampler._weights(program, _params(program)) is packed  # the views are recognised
    path = str(tmp_path / "views.safetensors")  # a checkpoint saved after inference holds the values
    mx.save_safetensors(path, dict(tree_flatten(unet.parameters())))
    assert all(mx.array_equal(v, dict(tree_flatten(unet.parameters()))[k]) for k, v in mx.load(path).items())
    # A replaced weight is packed again, and the kernel's programs for other batch sizes share the layout.
    unet.final_conv[1].bias = mx.ones_like(unet.final_conv[1].bias)
    other, _ = sampler._program(2, 16)
    repacked = sampler._weights(other, _params(other))
    assert repacked is not packed
    bias = unet.final_conv[1].bias
    assert mx.array_equal(bias, mx.ones_like(bias))
    final = next(i for i, (m, n) in enumerate(program.refs) if m is unet.final_conv[1] and n == "bias")
    offset = program.offsets[final]
    assert mx.array_equal(repacked[offset : offset + bias.size], bias)


def test_packed_weights_are_views_of_one_array():
    arrays = [mx.random.normal((8, 5, 4)) for _ in range(3)]
    offsets = [0, 160, 328]  # a gap of 8 between the second and the third
    packed, views = cuda_sampler.pack(arrays, offsets, 488)
    mx.eval(packed, *views)

    def address(a: mx.array) -> int:  # numpy reads MLX's buffer in place
        return np.asarray(a).__array_interface__["data"][0]

    for a, view, offset in zip(arrays, views, offsets, strict=True):
        assert address(view) == address(packed) + offset * packed.itemsize  # held once, not copied
        assert mx.array_equal(view, a)
    assert not np.asarray(packed)[320:328].any()


def _predict(policy, obs, kind, steps, persistent: bool) -> np.ndarray:
    original = cuda_sampler.CudaSampler.supports
    if not persistent:
        cuda_sampler.CudaSampler.supports = lambda self, batch, horizon, scheduler: False
    try:
        with warnings.catch_warnings():
            # An aborted kernel falls back to the chunked sampler with a warning: fail instead.
            warnings.filterwarnings("error", message=".*chunked sampler")
            return policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=1)[
                "action_pred"
            ]
    finally:
        cuda_sampler.CudaSampler.supports = original


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
@pytest.mark.parametrize("kind, steps", [("ddim", 10), ("ddpm", 13)])
def test_persistent_kernel_equals_chunked_sampler(kind, steps):
    mx.random.seed(0)  # the weights: not whatever state earlier tests left MLX's generator in
    policy = tiny_policy(image=True)
    obs = observation(policy, batch=2)
    assert policy._backends[0].supports(2, policy.config.horizon, policy._scheduler(kind, steps))
    out = _predict(policy, obs, kind, steps, persistent=True)
    ref = _predict(policy, obs, kind, steps, persistent=False)
    # Pixels, actions span 0..512: float32 rounding reached 1.6e-3 px in one of 16 weight draws (H200),
    # a wrong kernel is off by pixels.
    assert np.abs(out - ref).max() < 2e-3


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
@pytest.mark.parametrize("steps", [1, 3])
def test_persistent_kernel_runs_a_consistency_policy(steps):
    """The consistency sampler's table is a DDPM step's (x0 and x weights, noise std): the kernel runs a
    1-step request as one short launch, and a chain re-noised between its times."""
    mx.random.seed(0)
    teacher = tiny_policy(image=True)
    config = dataclasses.replace(
        teacher.config,
        consistency=ConsistencyConfig(skip=10, chains=((90,), (90, 50), (90, 60, 30))),
        sampler="consistency",
        num_inference_steps=1,
    )
    policy = build_policy(config, teacher.normalizer)
    policy.update(teacher.parameters())
    obs = observation(policy, batch=2)
    assert policy._backends[0].supports(2, config.horizon, policy._scheduler("consistency", steps))
    out = _predict(policy, obs, "consistency", steps, persistent=True)
    ref = _predict(policy, obs, "consistency", steps, persistent=False)
    assert np.abs(out - ref).max() < 2e-3


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
def test_persistent_kernel_in_bfloat16_is_no_less_accurate_than_the_chunked_sampler():
    # Against the same (bfloat16-valued) weights in float32: the kernel keeps float32 activations. The
    # weights are drawn from a fixed seed, not whatever state earlier tests left MLX's generator in, and
    # the paths are compared by their mean error: the largest of 64 errors swaps order between draws
    # (8 seeds on an H100: the kernel's mean error was the lower one in all 8, its largest in 7).
    mx.random.seed(0)
    policy = tiny_policy(image=True, dtype="bfloat16")
    exact = tiny_policy(image=True)
    exact.update(tree_map(lambda p: p.astype(mx.float32), policy.parameters()))
    obs = observation(policy, batch=2)
    ref = _predict(exact, obs, "ddim", 10, persistent=False)
    kernel_error = np.abs(_predict(policy, obs, "ddim", 10, persistent=True) - ref)
    chunked_error = np.abs(_predict(policy, obs, "ddim", 10, persistent=False) - ref)
    assert kernel_error.mean() <= chunked_error.mean()
    assert kernel_error.max() < 16.0  # pixels


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
def test_an_aborted_kernel_is_detected_and_leaves_no_trajectory(monkeypatch):
    # More threads than any SM holds (2048), so not every block is resident: the first barrier times out.
    policy = tiny_policy(image=False)
    obs = observation(policy, batch=1)
    expected = _predict(policy, obs, "ddim", 10, persistent=False)
    blocks = 9 * device.sm_count()
    monkeypatch.setattr(device, "sm_count", lambda: blocks)
    with pytest.warns(UserWarning, match="chunked sampler"):
        out = policy.predict_action(obs, scheduler="ddim", num_inference_steps=10, seed=1)["action_pred"]
    # The kernel's completion word in host memory says it gave up, and it wrote no trajectory there.
    ((result, _),) = policy._backends[0]._results._arrays.values()
    written = np.asarray(result)
    assert written[-1] == cuda_sampler.RESULT_ABORTED and not written[:-1].any()
    assert policy._backends[0].disabled
    assert np.array_equal(out, expected)


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_nan_weights_give_nan_actions_through_the_kernel(kind):
    # clip_sample clamps x0: a clamp that dropped NaN (fminf/fmaxf) pinned NaN weights' DDPM actions to
    # the range's edge, finite actions the server would send.
    policy = tiny_policy(image=False)
    weight = np.array(policy.unet.final_conv[1].weight)
    weight.flat[0] = np.nan
    policy.unet.final_conv[1].weight = mx.array(weight)
    assert policy.config.noise_scheduler.clip_sample
    assert policy._backends[0].supports(1, policy.config.horizon, policy._scheduler(kind, 10))
    assert np.isnan(_predict(policy, observation(policy, batch=1), kind, 10, persistent=True)).all()
