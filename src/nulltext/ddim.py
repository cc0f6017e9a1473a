"""Deterministic DDIM (eta = 0) in both directions, written for batched autograd.

Notation follows Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021), eq. (12) with
sigma = 0, and the official null-text code (Mokady et al., CVPR 2023):

    x0_hat = (z - sqrt(1 - a) * eps) / sqrt(a)          # predicted clean latent at level a
    z'     = sqrt(b) * x0_hat + sqrt(1 - b) * eps        # the same (x0_hat, eps) at level b

Denoising goes from t to t - k (a = alpha_bar[t], b = alpha_bar[t - k]); inversion goes from
s = t - k to t (a = alpha_bar[s], b = alpha_bar[t]). alpha_bar at a negative timestep is the
scheduler's final value (alpha_bar[0] for Stable Diffusion, whose ``set_alpha_to_one`` is False).
The noise schedule and the timesteps come from diffusers' own ``DDIMScheduler``, so they are the
ones every Stable Diffusion pipeline uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffusers import DDIMScheduler
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def split_model_output(model_output: Tensor, z: Tensor, alpha: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Return ``(x0_hat, eps)`` for a UNet output evaluated on a latent ``z`` at noise level ``alpha``.

    epsilon: eps is the output; x0_hat by DDIM eq. (12).
    v-prediction (Salimans & Ho 2022, sec. 4): v = sqrt(a) eps - sqrt(1-a) x0, hence
    x0_hat = sqrt(a) z - sqrt(1-a) v and eps = sqrt(a) v + sqrt(1-a) z. SD 2.x needs this; applying
    the epsilon formula to v collapses the trajectory.
    """
    sqrt_a, sqrt_1ma = math.sqrt(alpha), math.sqrt(1 - alpha)
    if prediction_type == "epsilon":
        return (z - sqrt_1ma * model_output) / sqrt_a, model_output
    if prediction_type == "v_prediction":
        return sqrt_a * z - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * z
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


def move_to_level(x0_hat: Tensor, eps: Tensor, alpha_to: float) -> Tensor:
    """DDIM eq. (12), sigma = 0: the latent at level ``alpha_to`` with the same (x0_hat, eps)."""
    return math.sqrt(alpha_to) * x0_hat + math.sqrt(1 - alpha_to) * eps


def ddim_map(z: Tensor, eps: Tensor, alpha_from: float, alpha_to: float) -> Tensor:
    """Phi_{s->r}(z, eps): the latent ``z`` at level ``alpha_from`` moved to ``alpha_to`` along ``eps``.

    DDIM eq. (12) with sigma = 0 written for a given noise estimate: sampling when ``alpha_to`` is
    the larger alpha-bar, inversion otherwise. Methods that evaluate the UNet on another latent than
    the one they move (EDICT, BDIA, fixed-point inversion) convert its output to eps first.
    """
    return move_to_level((z - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from), eps, alpha_to)


@dataclass(frozen=True)
class DDIMSchedule:
    """The alpha-bar table and inference timesteps of a DDIM sampler, and its two step directions.

    ``timesteps`` run from noisy to clean (981, 961, ..., 1 for SD with 50 steps and steps_offset=1).
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: Tensor
    timesteps: tuple[int, ...]
    step_ratio: int
    prediction_type: str

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int = 50) -> "DDIMSchedule":
        """Build from any diffusers scheduler config (SD ships PNDM's; the betas are what matter).

        ``steps_offset`` is kept from the config: Stable Diffusion pipelines force it to 1, which is
        where the official effective timesteps 981 ... 1 come from.
        """
        scheduler = DDIMScheduler.from_config(dict(config))
        scheduler.set_timesteps(num_inference_steps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.clone(),
            final_alpha_cumprod=scheduler.final_alpha_cumprod.clone(),
            timesteps=tuple(int(t) for t in scheduler.timesteps),
            step_ratio=scheduler.config.num_train_timesteps // num_inference_steps,
            prediction_type=prediction_type,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, t: int) -> float:
        """alpha_bar at timestep ``t``; the final value for t < 0 (the step past the last one).

        A Python number: scaling a GPU tensor by it needs no host-device copy (a tensor table
        would cost a synchronising copy on every step).
        """
        return float(self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod)

    def source_timestep(self, t: int) -> int:
        """The timestep one step below ``t`` (clamped at 0): where an inversion step starts."""
        return max(t - self.step_ratio, 0)

    def denoise_step(self, model_output: Tensor, t: int, z_t: Tensor) -> Tensor:
        """z_t -> z_{t-k}, with the UNet output evaluated on z_t at timestep t."""
        x0_hat, eps = split_model_output(model_output, z_t, self.alpha(t), self.prediction_type)
        return move_to_level(x0_hat, eps, self.alpha(t - self.step_ratio))

    def invert_step(self, model_output: Tensor, t: int, z_s: Tensor) -> Tensor:
        """z_{t-k} -> z_t, the UNet output evaluated on the SOURCE latent z_{t-k}.

        The official code evaluates the UNet at the target timestep t (the caller decides which
        timestep it used); the conversion of the output uses the source level, as the latent does.
        """
        x0_hat, eps = split_model_output(model_output, z_s, self.alpha(t - self.step_ratio), self.prediction_type)
        return move_to_level(x0_hat, eps, self.alpha(t))

    def add_noise(self, z0: Tensor, noise: Tensor, t: int) -> Tensor:
        """Forward process q(z_t | z_0) = N(sqrt(a_t) z_0, (1 - a_t) I) with a given noise draw."""
        return move_to_level(z0, noise, self.alpha(t))
