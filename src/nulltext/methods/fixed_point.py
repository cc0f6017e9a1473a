"""The implicit DDIM inversion step solved by fixed-point iteration: plain (FPI) and with averaging (ReNoise).

DDIM sampling maps z_t to z_{t-k} = Phi_{t->t-k}(z_t, eps(z_t, t)); its exact inverse is the z_t
that solves the implicit equation (METHODS.md section 5)

    z_t = Phi_{t-k->t}(z_{t-k}, eps_w(z_t, t)).

Both methods iterate z^(0) = z_{t-k}, z^(j+1) = Phi_{t-k->t}(z_{t-k}, eps_w(z^(j), t)); one iteration
is plain DDIM inversion (the UNet at the target timestep on the source latent). Neither is
machine-exact: quality depends on convergence. Both keep only z_T and sample with ordinary guided
DDIM, so Prompt-to-Prompt edits them unchanged.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.ddim import ddim_map
from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor, gaussian_like
from nulltext.validation import check_float, check_int, check_positive


def implicit_step(diffusion: Diffusion, z_source: Tensor, eps: Tensor, t: int) -> Tensor:
    """Phi_{t-k->t}(z_{t-k}, eps): the inversion step from the source latent along ``eps``."""
    schedule = diffusion.schedule
    return ddim_map(z_source, eps, schedule.alpha(t - schedule.step_ratio), schedule.alpha(t))


class _ImplicitInversion(InversionMethod):
    """Shared loop: embeddings, the trajectory of solved steps, an ordinary guided-DDIM record."""

    def __init__(self, inversion_guidance_scale: float, guidance_scale: float, extra_guidance_scales: Sequence[float]):
        super().__init__(extra_guidance_scales)
        self.inversion_guidance_scale = check_float("inversion_guidance_scale", inversion_guidance_scale, 0.0)
        self.guidance_scale = check_float("guidance_scale", guidance_scale, 0.0)

    def solve(self, diffusion: Diffusion, z_source: Tensor, t: int, uncond: Tensor, cond: Tensor, state: dict) -> Tensor:
        """z_t from z_{t-k}: the method's solution of the implicit step."""
        raise NotImplementedError

    def unet_calls_per_step(self) -> int:
        raise NotImplementedError

    def start(self, diffusion: Diffusion, z0: Tensor, seeds: list[int]) -> dict:
        """Per-batch state the solver needs (ReNoise's reference noise)."""
        return {"z0": z0}

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond = diffusion.encode_text(prompts)
        null = diffusion.encode_text([""]).expand_as(cond)
        state = self.start(diffusion, z0, seeds)
        latents = [z0]
        for t in reversed(diffusion.timesteps):
            latents.append(self.solve(diffusion, latents[-1], t, null, cond, state))
        return Inversion(
            z_T=latents[-1],
            uncond=null.unsqueeze(1),
            cond=cond.unsqueeze(1),
            prompts=prompts,
            guidance_scale=self.guidance_scale,
            iterations=[self.unet_calls_per_step() * diffusion.schedule.num_steps] * len(prompts),
            pivot=torch.stack(latents, dim=1),
            extra_guidance_scales=self.extra_guidance_scales,
        )


class FixedPointInversion(_ImplicitInversion):
    """Fixed-point inversion (Meiri, Samuel, Darshan, Chechik, Avidan, Ben-Ari, arXiv 2312.12540 v1).

    Plain iteration of the implicit step, with no averaging and no early stop (the official
    ``dvirsamuel/FPI`` code): z^(j+1) = Phi_{t-k->t}(z_{t-k}, eps_w(z^(j), t)), j < ``num_iterations``.
    ``num_iterations = 1`` is DDIM inversion at ``inversion_guidance_scale``. The official code
    inverts and samples with the same w = 2, which the exact inverse of the sampler needs (it then
    solves the sampler's own step); a different sampling scale is allowed, as an ablation.
    ``iterations`` counts UNet evaluations (``num_iterations`` per step).

    Not done: the paper's "prompt-aware adjustment" (an img2img pass at strength 0.05 before
    inverting).

    Args:
        num_iterations: fixed-point iterations per step (20 in the official ``main.py``).
        inversion_guidance_scale: w of eps_w inside the iteration (2).
        guidance_scale: w of the reconstruction and edit sampler (2).
    """

    name = "fixed_point"

    def __init__(
        self,
        num_iterations: int = 20,
        inversion_guidance_scale: float = 2.0,
        guidance_scale: float = 2.0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(inversion_guidance_scale, guidance_scale, extra_guidance_scales)
        self.num_iterations = check_int("num_iterations", num_iterations, 1)

    def unet_calls_per_step(self) -> int:
        return self.num_iterations

    def solve(self, diffusion: Diffusion, z_source: Tensor, t: int, uncond: Tensor, cond: Tensor, state: dict) -> Tensor:
        z = z_source
        for _ in range(self.num_iterations):
            z = implicit_step(diffusion, z_source, diffusion.noise_estimate(z, t, uncond, cond, self.inversion_guidance_scale), t)
        return z
