import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from policy_core.nets.unet import ConditionalUnet1D, sinusoidal_embedding


def n_params(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


@pytest.mark.parametrize(
    "global_cond, dsed, down_dims, expected",
    [
        (40, 256, (256, 512, 1024), 65_783_298),  # PushT lowdim
        (132, 128, (512, 1024, 2048), 251_511_938),  # PushT image (hybrid)
    ],
)
def test_parameter_counts_equal_upstream(global_cond, dsed, down_dims, expected):
    unet = ConditionalUnet1D(
        2, global_cond, dsed, down_dims, kernel_size=5, n_groups=8, cond_predict_scale=True
    )
    assert n_params(unet) == expected
    # Upstream's state_dict has 148 tensors for three levels.
    assert len(tree_flatten(unet.parameters())) == 148


def test_structure_follows_upstream():
    unet = ConditionalUnet1D(2, 10, 16, (16, 32, 64), kernel_size=3, n_groups=4, cond_predict_scale=True)
    names = {k for k, _ in tree_flatten(unet.parameters())}
    # Every up level upsamples; the last down level does not downsample.
    assert "up_modules.0.2.weight" in names and "up_modules.1.2.weight" in names
    assert "down_modules.1.2.weight" in names and not any(k.startswith("down_modules.2.2") for k in names)
    # Up path consumes skip connections: input channels 2 * 64 -> 32.
    assert unet.up_modules[0][0].blocks[0].conv.weight.shape == (32, 3, 128)
    # Final Conv1dBlock uses 8 groups regardless of n_groups.
    assert unet.final_conv[0].norm.num_groups == 8
    # FiLM predicts scale and bias.
    assert unet.mid_modules[0].cond_encoder.weight.shape == (128, 16 + 10)


def test_sinusoidal_embedding_layout():
    emb = sinusoidal_embedding(mx.array([0, 3]), 8)
    # sin first, then cos; t = 0 gives sin 0 = 0 and cos 0 = 1.
    assert mx.allclose(emb[0], mx.array([0, 0, 0, 0, 1, 1, 1, 1])).item()
    freqs = mx.exp(mx.arange(4) * -(mx.log(mx.array(10000.0)) / 3))
    assert mx.allclose(emb[1, :4], mx.sin(3 * freqs), atol=1e-6).item()


def test_per_sample_timesteps():
    unet = ConditionalUnet1D(2, 4, 16, (16, 32), kernel_size=3, n_groups=4, cond_predict_scale=True)
    x = mx.random.normal((2, 8, 2))
    g = mx.random.normal((2, 4))
    both = unet(x, mx.array([5, 70]), g)
    assert mx.allclose(both[0], unet(x[:1], 5, g[:1])[0], atol=1e-5).item()
    assert mx.allclose(both[1], unet(x[1:], 70, g[1:])[0], atol=1e-5).item()
