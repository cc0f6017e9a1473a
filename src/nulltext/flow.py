"""The rectified-flow Euler step of SD3 and FLUX in both directions, written for batched autograd.

A rectified-flow model predicts the velocity v = d z / d sigma of the straight path
z_sigma = (1 - sigma) z_0 + sigma * noise (Liu et al., ICLR 2023; Esser et al., "Scaling Rectified
Flow Transformers", ICML 2024). Sampling takes Euler steps from sigma_i down to sigma_{i+1}:

    z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v(z_i, t_i)     # FlowMatchEulerDiscreteScheduler.step, line 520 (diffusers 0.42.1)

and inversion the same step backwards, from sigma_{i+1} up to sigma_i, with the velocity evaluated
on the lower-noise latent it starts from (the "reverse Euler" of the flow-inversion literature):

    z_i = z_{i+1} + (sigma_i - sigma_{i+1}) * v(z_{i+1}, .)

With the same velocity the two steps undo each other exactly (up to float rounding). The sigmas
and the transformer's time inputs t_i = 1000 sigma_i come from diffusers' own
``FlowMatchEulerDiscreteScheduler``, set up as each pipeline sets it up (its shift, and FLUX's
resolution-dependent shift ``mu``), so they are the ones the stock pipelines use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


@dataclass(frozen=True)
class FlowSchedule:
    """The sigmas and time inputs of a rectified-flow Euler sampler, and its two step directions.

    ``timesteps`` run from noisy to clean (t_0 = 1000 sigma_0 ... t_{S-1}); ``sigmas`` has one more
    entry, the final 0. A timestep names the step that starts at its level, as for DDIM.
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]
    levels: tuple[float, ...]  # 1000 sigma_i for every sigma, the last one (0) included
    steps: tuple[float, ...]  # sigma_{i+1} - sigma_i, in float32 as the scheduler's step computes it
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({t: i for i, t in enumerate(self.timesteps)})

    @classmethod
    def from_scheduler_config(
        cls, config: dict, num_inference_steps: int, sigmas: np.ndarray | None = None, mu: float | None = None
    ) -> "FlowSchedule":
        """``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the arguments a pipeline passes.

        SD3 passes none (the config's ``shift`` applies); FLUX passes ``sigmas`` = linspace(1, 1/S, S)
        and ``mu`` from the image's token count (used when ``use_dynamic_shifting`` is on).
        """
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        # Both tables float32 as the scheduler keeps them; Python floats hold them exactly.
        levels = scheduler.sigmas * scheduler.config.num_train_timesteps
        return cls(
            sigmas=tuple(scheduler.sigmas.tolist()),
            timesteps=tuple(scheduler.timesteps.tolist()),
            levels=tuple(levels.tolist()),
            steps=tuple((scheduler.sigmas[1:] - scheduler.sigmas[:-1]).tolist()),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def source_timestep(self, t: float) -> float:
        """The time input of the level below ``t`` (0 below the last step): where an inversion step starts."""
        return self.levels[self._index[t] + 1]

    def denoise_step(self, velocity: Tensor, t: float, z: Tensor) -> Tensor:
        """z at sigma(t) -> the next level down, the velocity evaluated on z at t (the scheduler's step)."""
        return z + self.steps[self._index[t]] * velocity

    def invert_step(self, velocity: Tensor, t: float, z_s: Tensor) -> Tensor:
        """z at the level below t -> z at sigma(t), the velocity evaluated on the SOURCE latent ``z_s``."""
        return z_s - self.steps[self._index[t]] * velocity
