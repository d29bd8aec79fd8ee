import mlx.core as mx
import numpy as np
import pytest

from policy_core.normalizer import LinearNormalizer, fit_gaussian, fit_limits, image_range, mean_std


def test_limits_maps_range_to_unit_interval():
    rng = np.random.default_rng(0)
    data = rng.uniform([0, -5], [512, 5], (1000, 2)).astype(np.float32)
    norm = LinearNormalizer({"x": fit_limits(data)})
    y = np.array(norm.normalize("x", mx.array(data)))
    np.testing.assert_allclose(y.min(axis=0), [-1, -1], atol=1e-6)
    np.testing.assert_allclose(y.max(axis=0), [1, 1], atol=1e-6)
    back = norm.unnormalize("x", y)  # on the host, as the policy's actions
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, data, rtol=1e-5, atol=1e-4)


def test_limits_constant_dim_is_centred_not_scaled():
    data = np.stack([np.linspace(0, 1, 50), np.full(50, 7.0)], axis=1)
    f = fit_limits(data, range_eps=1e-4)
    assert f.scale[1] == 1.0 and f.offset[1] == -7.0
    norm = LinearNormalizer({"x": f})
    assert np.array(norm.normalize("x", mx.array(data.astype(np.float32))))[0, 1] == 0.0


def test_limits_fits_over_leading_axes():
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    f = fit_limits(data)
    np.testing.assert_array_equal(f.min, data.reshape(-1, 4).min(axis=0))
    np.testing.assert_array_equal(f.max, data.reshape(-1, 4).max(axis=0))


def test_gaussian_standardises():
    rng = np.random.default_rng(1)
    data = rng.normal([3.0, -2.0], [0.5, 4.0], (5000, 2))
    norm = LinearNormalizer({"x": fit_gaussian(data)})
    y = np.array(norm.normalize("x", mx.array(data.astype(np.float32))))
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=0), 1, atol=1e-4)


def test_image_range_and_mean_std():
    norm = LinearNormalizer(
        {"img": image_range(3), "imnet": mean_std([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
    )
    px = mx.array([[0.0, 0.5, 1.0]])
    assert np.array_equal(np.array(norm.normalize("img", px)), [[-1.0, 0.0, 1.0]])
    np.testing.assert_allclose(
        np.array(norm.normalize("imnet", px)),
        [[-0.485 / 0.229, (0.5 - 0.456) / 0.224, (1 - 0.406) / 0.225]],
        rtol=1e-6,
    )


def test_tensor_round_trip_is_exact():
    rng = np.random.default_rng(2)
    norm = LinearNormalizer(
        {"a": fit_limits(rng.normal(size=(100, 3))), "b": fit_gaussian(rng.normal(size=(100, 5)))}
    )
    tensors = norm.to_tensors()
    back = LinearNormalizer.from_tensors(tensors, ["a", "b"])
    for key in ("a", "b"):
        for name, value in norm[key].arrays().items():
            assert np.array_equal(value, back[key].arrays()[name])
            assert value.dtype == np.float32
    with pytest.raises(KeyError, match="normalizer.c.scale"):
        LinearNormalizer.from_tensors(tensors, ["c"])
