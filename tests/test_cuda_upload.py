"""HostUploads: observations written into arrays kept per key, shape and dtype
(policy_core/backends/cuda/host_arrays.py).

The bookkeeping and the writes run anywhere (on the CPU an MLX array's memory is the host's); the
driver's memory advice runs on a GPU only."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from helpers import observation, tiny_policy

from policy_core.backends import cuda
from policy_core.backends.cuda import host_arrays as cuda_upload


class _AdviceLog:
    # The CPU backend's arrays already live in host memory: record the advice instead.
    def __init__(self) -> None:
        self.kept: dict[int, int] = {}

    def keep_on_host(self, pointer: int, nbytes: int) -> None:
        assert pointer % cuda_upload.PAGE_BYTES == 0 and nbytes % cuda_upload.PAGE_BYTES == 0
        self.kept[pointer] = nbytes

    def release(self, pointer: int, nbytes: int) -> None:
        assert self.kept.pop(pointer) == nbytes


def _advised(monkeypatch) -> _AdviceLog:
    advice = _AdviceLog()
    monkeypatch.setattr(cuda_upload, "_driver", lambda: advice)
    monkeypatch.setattr(cuda_upload, "_managed_memory", lambda: True)  # as where MLX uses managed memory
    monkeypatch.setattr(cuda_upload.HostUploads, "failed", [])
    return advice


def test_uploads_refill_one_kept_array_per_key_shape_and_dtype(monkeypatch):
    if cuda.available():
        pytest.skip("the CPU form of the writes")
    advice = _advised(monkeypatch)
    uploads = cuda_upload.HostUploads()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8) for _ in range(3)]
    first = uploads("image", frames[0])
    assert np.array_equal(np.array(first), frames[0])
    for frame in frames[1:]:
        kept = uploads("image", frame)
        assert kept is first  # the same array, refilled
        assert np.array_equal(np.array(kept), frame)
        assert kept.astype(mx.float32).sum().item() == frame.astype(np.float32).sum()  # MLX reads it
    # Another key, shape or dtype has its own array; a Fortran-ordered input is written in C order.
    state = rng.uniform(size=(1, 2, 2)).astype(np.float32)
    assert uploads("agent_pos", state) is not first
    assert uploads("image", frames[0][:, :1]) is not first
    ordered = uploads("agent_pos", np.asfortranarray(state))
    assert np.array_equal(np.array(ordered), state)
    # Other dtypes go through mx.array (float64 becomes float32 there), MLX arrays are taken as they are.
    wide = uploads("agent_pos", state.astype(np.float64))
    assert wide.dtype == mx.float32 and np.allclose(np.array(wide), state)
    given = mx.array(state)
    assert uploads("agent_pos", given) is given
    # Advice covers whole pages, each inside the buffer made for its array (a page shared with another
    # allocation would move that one too), and is undone when the arrays go.
    starts = {view.__array_interface__["data"][0]: view.nbytes for _, view in uploads._arrays.values()}
    assert all(advice.kept[start] >= nbytes for start, nbytes in starts.items())
    assert len(advice.kept) == len(uploads._arrays) == 3
    del uploads, first, kept, ordered
    gc.collect()
    assert not advice.kept


def test_uploads_keep_a_bounded_number_of_arrays(monkeypatch):
    if cuda.available():
        pytest.skip("the CPU form of the writes")
    advice = _advised(monkeypatch)
    uploads = cuda_upload.HostUploads()
    for batch in range(1, cuda_upload.KEPT_ARRAYS + 1):
        uploads("agent_pos", np.zeros((batch, 2, 2), np.float32))
    uploads("agent_pos", np.ones((1, 2, 2), np.float32))  # batch 1 used again: now the most recent
    for batch in (100, 101):
        uploads("agent_pos", np.zeros((batch, 2, 2), np.float32))
    slots = {shape[0] for _, shape, _ in uploads._arrays}
    assert len(slots) == cuda_upload.KEPT_ARRAYS and 1 in slots and 2 not in slots and 3 not in slots
    gc.collect()
    assert len(advice.kept) == cuda_upload.KEPT_ARRAYS  # the evicted ones' advice undone


class _FailingAdvice(_AdviceLog):
    def keep_on_host(self, pointer: int, nbytes: int) -> None:
        raise RuntimeError("cuMemAdvise failed with CUDA driver error 1")


def test_uploads_fall_back_to_mx_array_where_the_advice_fails_or_memory_is_not_managed(monkeypatch):
    if cuda.available():
        pytest.skip("the CPU form of the writes")
    _advised(monkeypatch)
    monkeypatch.setattr(cuda_upload, "_driver", lambda: _FailingAdvice())
    uploads = cuda_upload.HostUploads()
    frames = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(1, 2, 8, 8, 3)
    with pytest.warns(UserWarning, match="through mx.array"):
        first = uploads("image", frames)
    assert np.array_equal(np.array(first), frames)
    assert np.array_equal(np.array(uploads("image", frames + 1)), frames + 1)  # no warning, no kept array
    assert not uploads._arrays and len(cuda_upload.HostUploads.failed) == 1
    # Without managed memory nothing is kept or advised either.
    advice = _advised(monkeypatch)
    monkeypatch.setattr(cuda_upload, "_managed_memory", lambda: False)
    assert np.array_equal(np.array(uploads("image", frames)), frames)
    assert not uploads._arrays and not advice.kept


@pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend (CI has no GPU)")
def test_uploaded_observations_give_the_same_actions_as_fresh_arrays():
    # Alternating observations through the kept arrays: each request sees its own, as with mx.array.
    policy = tiny_policy(image=True)
    observations = [observation(policy, batch=1, seed=s) for s in range(3)]
    for obs in observations * 2:
        fresh = {k: mx.array(v) for k, v in obs.items()}  # MLX arrays skip the uploads
        expected = policy.predict_action(fresh, scheduler="ddim", num_inference_steps=4, seed=7)
        uploaded = policy.predict_action(obs, scheduler="ddim", num_inference_steps=4, seed=7)
        assert np.array_equal(uploaded["action_pred"], expected["action_pred"])
    assert len(policy._backends[0]._uploads._arrays) == len(observations[0])
