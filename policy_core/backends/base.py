"""The interface between a policy and the ways its inference can run (see ``policy_core/backends``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from policy_core.nets.vision import ResNet18Trunk
from policy_core.schedulers import Scheduler


class BackendUnavailable(RuntimeError):
    """A backend could not finish a request it had accepted and takes no more; the next one reruns it."""


@dataclass(frozen=True)
class Inpainting:
    """Known actions a batch's trajectories are sampled to continue (real-time chunking, per row; a row
    whose weights are all 0 samples as a plain request does).

    Every array is float32 over the normalized trajectory (B, T, A), broadcast along A: ``target`` the
    known actions (anything where both weights are 0); ``guide`` (B, T, 1) the guidance weights, pulling
    each step's denoised estimate toward ``target`` by its vector-Jacobian product through the denoiser,
    scaled by min(``max_guidance`` (B, 1, 1), 1 / sqrt(a (1 - a))) at the step's cumulative alpha a (the
    paper's clipped weight); ``replace`` (B, T, 1) 1 where the trajectory is replaced by ``target``
    re-noised to each step's level and, after the last step, by ``target`` itself; 0 elsewhere."""

    target: mx.array
    guide: mx.array
    max_guidance: mx.array
    replace: mx.array
    guided: bool
    """Whether any guidance weight is nonzero (else no vector-Jacobian product is needed)."""


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

    inpaints: bool = False
    """Whether ``sample`` takes an ``inpainting`` argument; requests that carry one go to the next
    backend that does (the generic one does)."""

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
        (B, T, A) as float32 NumPy. A backend that ``inpaints`` takes an optional fifth
        argument, ``inpainting`` (an ``Inpainting``, or None)."""

    def image_trunk(self, trunk: ResNet18Trunk) -> Callable[[mx.array], mx.array] | None:
        """A faster inference form of an image encoder's trunk (same results, no gradients), or None to
        run the modules."""
        return None

    def host_array(self, key: str, value: Any) -> mx.array:
        """A request's observation ``value`` for key ``key`` as an MLX array this backend reads well."""
        return value if isinstance(value, mx.array) else mx.array(np.asarray(value))
