"""A policy runs each request on the first of its backends that takes it (policy_core/backends)."""

import numpy as np
import pytest
from helpers import observation, tiny_policy

from policy_core.backends.base import Backend, BackendUnavailable
from policy_core.backends.generic import GenericBackend, UnetTrunk


class Recording(Backend):
    """Takes batches up to ``max_batch``, runs them as the generic backend does and records them; gives up
    on the first request it takes when ``fail``."""

    name = "recording backend"

    def __init__(self, unet, max_batch: int, unpadded: bool = False, fail: bool = False):
        self.generic = GenericBackend(UnetTrunk(unet))
        self.max_batch, self.unpadded, self.fail = max_batch, unpadded, fail
        self.batches: list[int] = []
        self.failed = False

    def supports(self, batch, horizon, scheduler) -> bool:
        return batch <= self.max_batch and not self.failed

    def sample(self, scheduler, x, conditioning, step_noise) -> np.ndarray:
        self.batches.append(x.shape[0])
        if self.fail:
            self.failed = True
            raise BackendUnavailable("the recording backend gave up")
        return self.generic.sample(scheduler, x, conditioning, step_noise)


# Pixels: backends' float32 rounding differs by ~1e-3 px on a GPU; a wrong sampler is off by pixels.
TOLERANCE_PX = 5e-3


def _actions(policy, batch: int) -> np.ndarray:
    obs = observation(policy, batch=batch)
    return policy.predict_action(obs, scheduler="ddim", num_inference_steps=3, seed=0)["action_pred"]


def test_the_first_backend_that_takes_a_request_runs_it():
    policy = tiny_policy(image=False)
    expected = {batch: _actions(policy, batch) for batch in (1, 3)}
    assert isinstance(policy._backends[-1], GenericBackend)  # the fallback that takes every request
    recording = Recording(policy.unet, max_batch=2)
    policy._backends.insert(0, recording)
    for batch in (1, 3):
        assert np.allclose(_actions(policy, batch), expected[batch], atol=TOLERANCE_PX)
    assert recording.batches == [1]  # batch 3 went on to the generic backend


def test_a_backend_that_gives_up_hands_the_request_to_the_next_and_takes_no_more():
    policy = tiny_policy(image=False)
    expected = _actions(policy, 1)
    recording = Recording(policy.unet, max_batch=8, fail=True)
    policy._backends.insert(0, recording)
    with pytest.warns(UserWarning, match="gave up; this and later requests run on the chunked sampler"):
        out = _actions(policy, 1)
    assert np.allclose(out, expected, atol=TOLERANCE_PX)
    _actions(policy, 1)
    assert recording.batches == [1]


def test_unpadded_batch_sizes_are_those_an_unpadded_backend_takes_first():
    policy = tiny_policy(image=False)
    assert policy.unpadded_batch_sizes(8) == []
    policy._backends.insert(0, Recording(policy.unet, max_batch=3, unpadded=True))
    assert policy.unpadded_batch_sizes(8) == [1, 2, 3]
