"""FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas, Michaeli, "FlowEdit: Inversion-Free Text-Based Editing
Using Pre-Trained Flow Models", ICCV 2025, arXiv 2412.08629): editing SD3 and FLUX images without inversion.

FlowEdit integrates an ODE from the source latent x_src straight to the edit, along the DIFFERENCE of the
target and source velocities. At level sigma_i of the sampler (only the last ``n_max`` of its S steps):

    z_src  = (1 - sigma_i) x_src + sigma_i n          (n ~ N(0, I), a fresh draw, n_avg of them averaged)
    z_tar  = z_src + (z_edit - x_src)
    dv     = mean over the draws of  v_w_tar(z_tar, t_i; target) - v_w_src(z_src, t_i; source)
    z_edit = z_edit + (sigma_{i+1} - sigma_i) dv       (z_edit starts at x_src)

each velocity guided as the family samples (SD3: classifier-free guidance with psi(""), the negative
prompt run_script.py passes; FLUX: the guidance input). No trajectory is stored and nothing is inverted.

Official code: fallenshock/FlowEdit ``FlowEdit_utils.py`` (``FlowEditSD3``, ``FlowEditFLUX``) with the
settings of ``SD3_exp.yaml`` / ``FLUX_exp.yaml``. The reference index this was written from holds only the
official repository's README and data, so the code was read, and the line numbers below are given, in the
copy of those files in the fork netita/FlowEdit@02116f6. ``n_min`` (plain sampling for the last steps) is 0
in both official settings and is not implemented.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nulltext.cost import UNetCounter
from nulltext.diffusion import Diffusion
from nulltext.editing.sampling import EditOutput
from nulltext.reconstruction import to_uint8
from nulltext.validation import SettingError, check_float, check_int

# SD3_exp.yaml and FLUX_exp.yaml (T_steps, n_max, src_guidance_scale, tar_guidance_scale; n_avg 1, n_min 0 in both).
PUBLISHED = {
    "sd3": {"num_steps": 50, "n_max": 33, "src_guidance_scale": 3.5, "tar_guidance_scale": 13.5},
    "flux": {"num_steps": 28, "n_max": 24, "src_guidance_scale": 1.5, "tar_guidance_scale": 5.5},
}


def flowedit_settings(family: str, n_max: int | None, n_avg: int, src_guidance_scale: float | None, tar_guidance_scale: float | None) -> dict:
    """The settings checked, None replaced by the published value for ``family`` (a one-line error off SD3/FLUX)."""
    if family not in PUBLISHED:
        raise SettingError(f"mode=flowedit (FlowEdit) runs on SD3 and FLUX models only, this is a {family} model: use mode=replace, refine, reweight or sdedit")
    published = PUBLISHED[family]
    return {
        "n_max": check_int("n_max", published["n_max"] if n_max is None else n_max, 0),
        "n_avg": check_int("n_avg", n_avg, 1),
        "src_guidance_scale": check_float("src_guidance_scale", published["src_guidance_scale"] if src_guidance_scale is None else src_guidance_scale),
        "tar_guidance_scale": check_float("tar_guidance_scale", published["tar_guidance_scale"] if tar_guidance_scale is None else tar_guidance_scale),
    }


@torch.no_grad()
def flowedit(
    diffusion: Diffusion,
    x_src: Tensor,
    source_prompt: str,
    target_prompts: Sequence[str],
    n_max: int | None = None,
    n_avg: int = 1,
    src_guidance_scale: float | None = None,
    tar_guidance_scale: float | None = None,
    seed: int = 0,
) -> EditOutput:
    """Row 0: x_src itself (FlowEdit's answer when nothing changes); rows 1..K: FlowEdit of ``x_src`` [1, C, h, w] to each target.

    Settings left None take the published values of the model's family (:data:`PUBLISHED`); the
    sampler's steps are ``diffusion``'s. Every target sees the same noise draws (one generator seeded
    with ``seed`` per target), so an edit does not depend on the other targets.
    """
    settings = flowedit_settings(diffusion.family.name, n_max, n_avg, src_guidance_scale, tar_guidance_scale)
    diffusion.check_latents(x_src)
    null = diffusion.null_text()
    source = diffusion.encode_text([source_prompt])
    targets = diffusion.encode_text(list(target_prompts)) if target_prompts else None
    steps = diffusion.schedule.num_steps
    # FlowEditSD3 lines 173-174 / FlowEditFLUX lines 324-325: step i runs when S - i <= n_max.
    first = max(steps - settings["n_max"], 0)
    with UNetCounter(diffusion.unet) as evaluations:
        edits = [
            flowedit_latent(
                diffusion, x_src, null, source, targets[k : k + 1], first, settings["n_avg"], settings["src_guidance_scale"], settings["tar_guidance_scale"], seed
            )
            for k in range(len(target_prompts))
        ]
    latents = torch.cat([x_src, *edits])
    active = steps - first
    return EditOutput(
        images=to_uint8(diffusion.decode(latents)).cpu(),
        latents=latents.cpu(),
        prompts=[source_prompt, *target_prompts],
        settings={
            "mode": "flowedit",
            **settings,
            "seed": seed,
            "num_inference_steps": steps,
            "first_step": first,
            "denoiser_evaluations": evaluations.rows,
            "denoiser_evaluations_per_step": evaluations.rows / (len(target_prompts) * active) if target_prompts and active else 0,
        },
    )


def flowedit_latent(
    diffusion: Diffusion,
    x_src: Tensor,
    null: Tensor,
    source: Tensor,
    target: Tensor,
    first: int,
    n_avg: int,
    src_guidance_scale: float,
    tar_guidance_scale: float,
    seed: int,
) -> Tensor:
    """FlowEdit's ODE for one target context [1, L, D], steps ``first``..S-1 of the sampler; the edited latent."""
    schedule = diffusion.schedule
    generator = torch.Generator().manual_seed(seed)
    z_edit = x_src
    for i in range(first, schedule.num_steps):
        t, sigma = schedule.timesteps[i], schedule.sigmas[i]
        delta = torch.zeros_like(x_src)
        for _ in range(n_avg):
            # FlowEditSD3 lines 188-198 (FlowEditFLUX 342-367). The official code adds zt_edit + zt_src - x_src;
            # adding the difference (z_edit - x_src) instead is the same sum, and exactly z_src while z_edit is
            # x_src, so that an edit to the source prompt at the source scale is x_src bit for bit.
            noise = torch.randn(x_src.shape, generator=generator).to(x_src)
            z_src = (1 - sigma) * x_src + sigma * noise
            z_tar = z_src + (z_edit - x_src)
            # SD3 (calc_v_sd3, lines 54-80): one call on [z_src, z_src, z_tar, z_tar] with [null, source, null,
            # target]; here two guided calls of two rows each, the same rows. FLUX (calc_v_flux, 84-107): one
            # call each with the guidance input src_ / tar_guidance_scale.
            v_src = diffusion.guided_output(z_src, t, null, source, src_guidance_scale)
            v_tar = diffusion.guided_output(z_tar, t, null, target, tar_guidance_scale)
            delta += (1 / n_avg) * (v_tar - v_src)
        # Line 203 (FLUX 372): z_edit + (t_im1 - t_i) dv, the sampler's Euler step. FLUX's t_i are the scheduler's
        # sigmas, as here; SD3's are its timesteps / 1000, which equal them to float32 rounding.
        z_edit = schedule.denoise_step(delta, t, z_edit)
    return z_edit
