"""The sampler's fast paths against the reference modules they replace."""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from policy_core.backends import cuda
from policy_core.backends.cuda import fused_unet
from policy_core.backends.matmul_unet import conv1d, denoise, group_norm_mish, upsample1d
from policy_core.nets.unet import ConditionalUnet1D, mish


def channels_first(x: mx.array) -> mx.array:
    return x.transpose(2, 0, 1)


def test_one_exp_mish_equals_mish_and_its_gradient():
    x = mx.concatenate([mx.linspace(-60, 60, 20001), mx.array([-1e4, 1e4])])
    assert mx.allclose(mish(x), nn.mish(x), rtol=1e-6, atol=2e-6).item()
    grad = mx.grad(lambda v: mish(v).sum())(x)
    ref = mx.grad(lambda v: nn.mish(v).sum())(x)
    assert mx.abs(grad - ref).max().item() < 1e-5
    # float16 and bfloat16 are computed in float32: no overflow to inf/nan at large inputs.
    for dtype in (mx.float16, mx.bfloat16):
        y = mish(mx.array([-30.0, -1.0, 0.5, 8.0, 30.0], dtype=dtype))
        assert y.dtype == dtype
        expected = [-2.8e-12, -0.3034, 0.3752, 8.0, 30.0]
        assert np.allclose(np.array(y.astype(mx.float32)), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kernel, stride, padding", [(5, 1, 2), (3, 2, 1), (1, 1, 0), (3, 1, 1)])
def test_conv1d_as_one_matmul_equals_conv1d(kernel, stride, padding):
    conv = nn.Conv1d(6, 10, kernel, stride=stride, padding=padding)
    x = mx.random.normal((3, 9, 6))
    ref = conv(x)
    out = conv1d(channels_first(x), conv)
    assert out.shape == (10, 3, ref.shape[1])
    assert mx.abs(channels_first(ref) - out).max().item() < 1e-5


def test_upsample1d_equals_conv_transpose1d():
    conv = nn.ConvTranspose1d(6, 5, 4, stride=2, padding=1)
    x = mx.random.normal((3, 7, 6))
    ref = conv(x)
    out = upsample1d(channels_first(x), conv)
    assert out.shape == (5, 3, 14)
    assert mx.abs(channels_first(ref) - out).max().item() < 1e-5
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1"):
        upsample1d(channels_first(x), nn.ConvTranspose1d(6, 5, 3, stride=2, padding=1))


def test_group_norm_mish_equals_group_norm_then_mish():
    norm = nn.GroupNorm(4, 16, pytorch_compatible=True)
    norm.weight = mx.random.normal((16,))
    norm.bias = mx.random.normal((16,))
    x = 3 * mx.random.normal((2, 8, 16)) + 1
    ref = nn.mish(norm(x))
    assert mx.abs(channels_first(ref) - group_norm_mish(channels_first(x), norm)).max().item() < 1e-5


TRUNKS = {"matmul": denoise, "cuda": fused_unet.denoise}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
@pytest.mark.parametrize("scale, batch", [(True, 1), (False, 3)])
def test_fast_trunks_equal_forward_film(trunk, scale, batch):
    if trunk == "cuda" and not cuda.available():
        pytest.skip("needs MLX's CUDA backend (CI has no GPU)")
    unet = ConditionalUnet1D(3, 12, 32, (16, 32, 64), kernel_size=5, n_groups=4, cond_predict_scale=scale)
    x = mx.random.normal((batch, 16, 3))
    films = [mx.random.normal((batch, blk.cond_encoder.weight.shape[0])) for blk in unet.residual_blocks()]
    ref = unet.forward_film(x, films)
    compiled = mx.compile(lambda x, *f: TRUNKS[trunk](unet, x, list(f)))  # as the sampler runs it
    out = compiled(x, *films)
    assert out.shape == ref.shape == (batch, 16, 3)
    assert mx.abs(out - ref).max().item() < 1e-5


def test_denoise_in_bfloat16_tracks_float32():
    unet = ConditionalUnet1D(2, 8, 32, (32, 64), kernel_size=5, n_groups=8, cond_predict_scale=True)
    x = mx.random.normal((1, 16, 2))
    films = [mx.random.normal((1, blk.cond_encoder.weight.shape[0])) for blk in unet.residual_blocks()]
    ref = denoise(unet, x, films)
    unet.set_dtype(mx.bfloat16)
    out = denoise(unet, x.astype(mx.bfloat16), [f.astype(mx.bfloat16) for f in films])
    assert out.dtype == mx.bfloat16
    rel = (mx.abs(out.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item()
    assert rel < 0.05


def test_direct_launches_are_a_default_an_explicit_setting_overrides(monkeypatch):
    monkeypatch.delenv("MLX_USE_CUDA_GRAPHS", raising=False)
    cuda.use_direct_launches()
    assert os.environ["MLX_USE_CUDA_GRAPHS"] == "0"
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "1")
    cuda.use_direct_launches()
    assert os.environ["MLX_USE_CUDA_GRAPHS"] == "1"
