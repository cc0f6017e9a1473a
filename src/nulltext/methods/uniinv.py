"""Uni-Inv (Jiao, Huang, Wang, Liao, "UniEdit-Flow: Unleashing Inversion and Editing in the Era of Flow
Models", ICLR 2026, arXiv 2504.13109): a predictor-corrector inversion for rectified-flow models.

Plain flow inversion (reverse Euler) climbs from level k-1 to level k along the velocity at the LOWER
latent; Euler sampling comes back down along the velocity at the UPPER one, hence its error. Uni-Inv
approximates the implicit (backward) Euler step z_k = z_{k-1} + dsigma_k v(z_k, t_k) with one
evaluation per step: a predictor reuses the previous step's velocity to guess z_k, the velocity is
evaluated there, and the corrector takes the step from z_{k-1} along it:

    z^_k = z_{k-1} + dsigma_k v_{k-1}            (v_0 = v(z_0, 0), or 0 with zero_initial)
    v_k  = v(z^_k, t_k)
    z_k  = z_{k-1} + dsigma_k v_k

Official code: DSL-Lab/UniEdit-Flow@e3633bc, UniEdit-Flow_diffusers/schedulers/UniInvEulerScheduler.py
(``UniInvEulerScheduler``, driven by the stock pipeline in demo_inv_rec.py), and the same steps in
UniEdit-Flow_FLUX/src/flux/sampling.py ``denoise_uniinv``. Reconstruction is the ordinary Euler
sampler (demo_inv_rec.py samples with the stock FlowMatchEulerDiscreteScheduler), so the record is a
plain guided-sampling inversion and ``nulltext reconstruct`` needs no sampler of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor
from nulltext.validation import SettingError, check_float


class UniInversion(InversionMethod):
    """Uni-Inv: predictor-corrector flow inversion, one velocity per step (plus one at sigma = 0).

    Args:
        zero_initial: start with a zero velocity instead of evaluating v(z_0, 0) (the official
            ``zero_initial`` / ``--zero_init`` option, off by default): S evaluations instead of S + 1.
        guidance_scale: w of reconstruction and editing; 1, as demo_inv_rec.py reconstructs
            (guidance_scale=1.0: SD3 samples conditionally only, FLUX gets guidance input 1).

    The inversion itself always runs at w = 1 (FLUX: guidance input 1), as demo_inv_rec.py and
    edit.py (``guidance=1`` when inverting) do. Cost: S + 1 denoiser evaluations to invert S steps
    (S with ``zero_initial``), S to reconstruct at w = 1 (2S at w != 1 on SD3).
    """

    name = "uniinv"
    families = ("sd3", "flux")

    def __init__(self, zero_initial: bool = False, guidance_scale: float = 1.0, extra_guidance_scales: Sequence[float] = ()):
        super().__init__(extra_guidance_scales)
        if not isinstance(zero_initial, bool):
            raise SettingError(f"inversion.zero_initial={zero_initial!r} is not allowed: true or false")
        self.zero_initial = zero_initial
        self.guidance_scale = check_float("inversion.guidance_scale", guidance_scale)

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        diffusion.check_latents(z0)
        cond, null = diffusion.encode_prompts(prompts)
        schedule = diffusion.schedule
        # UniInvEulerScheduler.step, first call (lines 126-138): v(z_0) at the inverse schedule's first
        # timestep, 0; with zero_initial (set_timesteps lines 80-85, step lines 143-146) that evaluation
        # is skipped, which is edit_uniedit's zero first velocity in sampling.py (``info['zero_init']``).
        velocity = torch.zeros_like(z0) if self.zero_initial else diffusion.guided_output(z0, 0.0, null, cond, 1.0)
        z = z0
        latents = [z0]
        for t in reversed(schedule.timesteps):  # the inversion step that ends at level t
            # step, later calls (lines 139-163): the predicted latent is the previous call's prev_sample,
            # z_{k-1} + dt_k v_{k-1}; the model runs on it at the step's upper level; the corrected latent
            # is z_{k-1} + dt_k v_k. schedule.invert_step subtracts the float32 sampling step, which is
            # exactly the scheduler's dt = sigma_next - sigma of the flipped sigmas.
            predicted = schedule.invert_step(velocity, t, z)
            velocity = diffusion.guided_output(predicted, t, null, cond, 1.0)
            z = schedule.invert_step(velocity, t, z)
            latents.append(z)
        return self.pivot_record(torch.stack(latents, dim=1), null, cond, prompts, self.guidance_scale)
