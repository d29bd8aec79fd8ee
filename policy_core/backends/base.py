"""The interface between a policy and the ways its inference can run (see ``policy_core/backends``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from policy_core.nets.vision import ResNet18Trunk
from policy_core.schedulers import Scheduler


class BackendUnavailable(RuntimeError):
    """A backend could not finish a request it had accepted and takes no more; the next one reruns it."""


class Backend(ABC):
    """One way to run a policy's denoising loop on this machine.

    The policy computes a request's conditioning of every step, in the form its denoiser defines (the UNet
    blocks' FiLM rows; the transformer decoder's memory keys and values), and hands it to the first of its
    backends whose ``supports`` accepts the request. A policy's backends are built for its network
    (``policy_core.backends.for_unet``, ``for_transformer``). The first backend of the list also prepares
    the request's inputs (``host_array``, ``image_trunk``)."""

    name: str
    """What it is, in words (a warning names the backend a request falls back to)."""

    unpadded: bool = False
    """Whether a batch's time grows with every row, padding rows included: a server that batches
    requests should run the sizes this backend takes as they are rather than pad them."""

    @abstractmethod
    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        """Whether this backend can run a request of this shape and sampler here and now."""

    @abstractmethod
    def sample(
        self, scheduler: Scheduler, x: mx.array, conditioning: mx.array, step_noise: mx.array
    ) -> np.ndarray:
        """Every step of ``scheduler``'s schedule (``set_timesteps`` done) from x_T ``x`` (B, T, A) float32:
        ``conditioning`` (S, ...) the network's conditioning of each step (for the UNet (S, B, sum of the
        blocks' m) float32 FiLM rows), ``step_noise`` (S, B, T, A). Returns the normalized trajectory
        (B, T, A) as float32 NumPy."""

    def image_trunk(self, trunk: ResNet18Trunk) -> Callable[[mx.array], mx.array] | None:
        """A faster inference form of an image encoder's trunk (same results, no gradients), or None to
        run the modules."""
        return None

    def host_array(self, key: str, value: Any) -> mx.array:
        """A request's observation ``value`` for key ``key`` as an MLX array this backend reads well."""
        return value if isinstance(value, mx.array) else mx.array(np.asarray(value))
