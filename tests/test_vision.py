from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from policy_core.backends.cuda import device
from policy_core.backends.cuda import trunk as vision_cuda
from policy_core.nets.vision import ResNet18Trunk, RgbEncoder, SpatialSoftmax


def _num_params(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


@pytest.fixture(scope="module")
def encoder() -> RgbEncoder:
    return RgbEncoder((96, 96, 3), crop_shape=(84, 84))


def _position_images(n: int, h: int, w: int) -> mx.array:
    # uint8 images whose channels 0/1 hold each pixel's row/column index.
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return mx.array(np.broadcast_to(image, (n, h, w, 3)).copy())


def _decode(crops: mx.array) -> np.ndarray:
    return np.array(crops).astype(np.int64)


def test_param_counts(encoder):
    assert _num_params(encoder.trunk) == 11_176_512
    assert _num_params(encoder.spatial_softmax.conv) == 512 * 32 + 32
    assert _num_params(encoder) == 11_197_088
    assert encoder.output_dim == 64


def test_avg_pool_variant():
    enc = RgbEncoder((32, 32, 3), crop_shape=None, pool="avg")
    assert enc.output_dim == 512
    assert _num_params(enc) == 11_176_512
    assert enc(mx.random.uniform(shape=(2, 32, 32, 3))).shape == (2, 512)


def test_trunk_feature_map_shapes(encoder):
    for size in (84, 96):
        assert encoder.trunk(mx.zeros((1, size, size, 3))).shape == (1, 3, 3, 512)


def test_output_shape(encoder):
    out = encoder(mx.random.uniform(shape=(2, 96, 96, 3)), random_crop=True)
    assert out.shape == (2, 64)
    assert mx.all(out >= 0).item()


def test_eval_center_crop(encoder):
    x = mx.random.uniform(shape=(2, 96, 96, 3))
    assert mx.array_equal(encoder.crop(x, random_crop=False), x[:, 6:90, 6:90])
    uncropped = RgbEncoder((84, 84, 3), crop_shape=None)
    uncropped.update(encoder.parameters())
    first, second, reference = encoder(x), encoder(x), uncropped(x[:, 6:90, 6:90])
    assert mx.array_equal(first, second)
    assert mx.allclose(first, reference, atol=1e-5).item()


def test_train_random_crop_offsets():
    enc = RgbEncoder((20, 24, 3), crop_shape=(16, 18), pool="avg")
    mx.random.seed(0)
    images = _position_images(256, 20, 24)
    first, second = _decode(enc.crop(images, True)), _decode(enc.crop(images, True))
    for crops in (first, second):
        assert crops.shape == (256, 16, 18, 3)
        top, left = crops[:, 0, 0, 0], crops[:, 0, 0, 1]
        # Offsets cover exactly [0, H - ch) and [0, W - cw), like upstream.
        assert top.min() == 0 and top.max() == 20 - 16 - 1
        assert left.min() == 0 and left.max() == 24 - 18 - 1
        # Every crop is a contiguous window starting at its offset.
        assert (crops[..., 0] == top[:, None, None] + np.arange(16)[None, :, None]).all()
        assert (crops[..., 1] == left[:, None, None] + np.arange(18)[None, None, :]).all()
    # Identical input images get different crops within a batch and across calls.
    assert len(np.unique(first[:, 0, 0, :2], axis=0)) > 1
    assert not np.array_equal(first, second)


def test_spatial_softmax_peaks():
    h, w, num_kp = 5, 7, 3
    ssm = SpatialSoftmax(in_channels=num_kp, num_kp=num_kp)
    # Keypoint k reads channel k only.
    ssm.conv.weight = mx.eye(num_kp).reshape(num_kp, 1, 1, num_kp)
    ssm.conv.bias = mx.zeros((num_kp,))
    peaks = [(0, 0), (4, 6), (1, 3)]
    features = np.zeros((1, h, w, num_kp), dtype=np.float32)
    for k, (row, col) in enumerate(peaks):
        features[0, row, col, k] = 100.0
    out = np.array(ssm(mx.array(features)))
    xs, ys = np.linspace(-1, 1, w), np.linspace(-1, 1, h)
    expected = np.array([[xs[col], ys[row]] for row, col in peaks]).reshape(1, -1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_spatial_softmax_grid_not_a_parameter():
    ssm = SpatialSoftmax()
    assert sorted(k for k, _ in tree_flatten(ssm.parameters())) == ["conv.bias", "conv.weight"]
    assert ssm(mx.zeros((2, 3, 4, 512))).shape == (2, 64)


def test_every_parameter_gets_gradient():
    enc = RgbEncoder((64, 64, 3), crop_shape=None)  # 2x2 feature map: softmax is not constant
    images = mx.random.uniform(shape=(4, 64, 64, 3))

    def loss_fn(model: RgbEncoder) -> mx.array:
        return (model(images) ** 2).mean()

    _, grads = nn.value_and_grad(enc, loss_fn)(enc)
    flat = tree_flatten(grads)
    assert len(flat) == len(tree_flatten(enc.parameters()))
    for name, grad in flat:
        assert mx.all(mx.isfinite(grad)).item(), name
        assert mx.any(grad != 0).item(), name


def test_trunk_is_module_with_torchvision_names():
    names = {k for k, _ in tree_flatten(ResNet18Trunk().parameters())}
    assert "layer2.0.downsample.0.weight" in names
    assert "layer4.1.bn2.bias" in names
    assert not any("layer1.0.downsample" in k for k in names)


def _randomized_norms(trunk: ResNet18Trunk) -> ResNet18Trunk:
    # Non-trivial GroupNorm affines, so a swapped gamma/beta or group would show.
    norms = [
        (
            name,
            mx.random.uniform(0.5, 1.5, v.shape)
            if name.endswith("weight")
            else 0.1 * mx.random.normal(v.shape),
        )
        for name, v in tree_flatten(trunk.parameters())
        if v.ndim == 1
    ]
    trunk.update(tree_unflatten(norms))
    return trunk


# 96x96: 9216 values per group after the stem, the 512-thread kernel that keeps them in registers.
@pytest.mark.parametrize("shape", [(2, 84, 84, 3), (1, 45, 37, 3), (1, 96, 96, 3)])
def test_cuda_trunk_equals_the_module_trunk(shape):
    if not vision_cuda.supports(ResNet18Trunk()):
        pytest.skip("needs MLX's CUDA backend (CI has no GPU)")
    mx.random.seed(0)
    trunk = _randomized_norms(ResNet18Trunk())
    x = mx.random.normal(shape)
    ref = trunk(x)
    out = mx.compile(lambda x: vision_cuda.trunk(trunk, x))(x)  # as the conditioning runs it
    assert out.shape == ref.shape
    assert mx.abs(out - ref).max().item() < 1e-4 * max(1.0, mx.abs(ref).max().item())


def test_cuda_trunk_serves_every_batch_size_with_one_program(monkeypatch):
    # The batch is read at run time: a server's batch buckets share one compiled kernel per image shape.
    if not vision_cuda.supports(ResNet18Trunk()):
        pytest.skip("needs MLX's CUDA backend (CI has no GPU)")
    monkeypatch.setattr(vision_cuda, "_KERNELS", {})
    mx.random.seed(2)
    trunk = _randomized_norms(ResNet18Trunk())
    for batch in (1, 3, 8, 2):
        x = mx.random.normal((batch, 40, 44, 3))
        ref = trunk(x)
        out = vision_cuda.trunk(trunk, x)
        assert out.shape == ref.shape
        assert mx.abs(out - ref).max().item() < 1e-4 * max(1.0, mx.abs(ref).max().item()), batch
    assert len(vision_cuda._KERNELS) == 1


def test_cuda_trunk_in_bfloat16_tracks_float32():
    if not vision_cuda.supports(ResNet18Trunk()):
        pytest.skip("needs MLX's CUDA backend (CI has no GPU)")
    mx.random.seed(1)
    trunk = _randomized_norms(ResNet18Trunk())
    x = mx.random.normal((2, 84, 84, 3))
    ref = trunk(x)
    trunk.set_dtype(mx.bfloat16)
    out = vision_cuda.trunk(trunk, x.astype(mx.bfloat16))
    module = trunk(x.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16
    # No worse than the module trunk in bfloat16.
    err = mx.abs(out.astype(mx.float32) - ref).mean().item()
    assert err <= 1.5 * mx.abs(module.astype(mx.float32) - ref).mean().item() + 1e-3


def test_cuda_trunk_serves_groupnorm_trunks_and_leaves_frozen_batchnorm_to_the_modules(monkeypatch):
    monkeypatch.setattr(device, "available", lambda: True)  # as on a CUDA device
    monkeypatch.setattr(device, "sm_count", lambda: 132)
    assert vision_cuda.supports(ResNet18Trunk(norm="group"))
    assert not vision_cuda.supports(ResNet18Trunk(norm="batch"))


@pytest.mark.parametrize("shape", [(2, 84, 84, 3), (1, 45, 37, 3), (16, 96, 96, 3)])
@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("blocks, shared_bytes", [(132, 227 * 1024 - 1024), (58, 99 * 1024 - 1024)])
def test_cuda_trunk_program_fits_the_device(shape, itemsize, blocks, shared_bytes):
    # The kernel's plan is made on the host (runs anywhere): every convolution's tiles fit the block's
    # shared memory of an H100 and of an L4-sized device, and the phases chain to the trunk's output.
    program = vision_cuda._Program(ResNet18Trunk(), shape, blocks, itemsize, shared_bytes)
    assert program.shared_floats * 4 <= shared_bytes
    assert program.layers == len(vision_cuda._layers(ResNet18Trunk())) == 20
    assert len(program.phases) == 19  # stem, pooling, two per BasicBlock, output
    assert program.out_per_image == ResNet18Trunk()(mx.zeros((1, *shape[1:]))).shape[1:]


def test_cuda_trunk_leaves_batches_past_its_32_bit_offsets_to_the_modules(monkeypatch):
    # The kernel indexes its workspace with ints: a batch whose workspace passes 2**31 floats is the
    # modules' (the kernel itself is never called).
    huge = SimpleNamespace(ws_size=2**31 // 2)
    monkeypatch.setattr(vision_cuda, "_kernel", lambda module, shape, dtype: (huge, None))
    trunk = ResNet18Trunk()
    x = mx.random.normal((2, 33, 33, 3))
    assert mx.array_equal(vision_cuda.trunk(trunk, x), trunk(x))


def test_cuda_trunk_leaves_inputs_too_large_for_its_tiles_to_the_modules(monkeypatch):
    # A 112x112 float32 input has no tiling of the 512-channel layers within an L4-sized block's shared
    # memory: the trunk is then the modules' (planning runs anywhere; the kernel is never built).
    monkeypatch.setattr(device, "sm_count", lambda: 58)
    monkeypatch.setattr(device, "max_shared_bytes", lambda: 99 * 1024 - 1024)
    monkeypatch.setattr(vision_cuda, "_KERNELS", {})
    trunk = ResNet18Trunk()
    x = mx.random.normal((1, 112, 112, 3))
    assert vision_cuda._kernel(trunk, x.shape, x.dtype) is None
    assert mx.array_equal(vision_cuda.trunk(trunk, x), trunk(x))
