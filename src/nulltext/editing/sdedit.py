"""SDEdit (Meng et al. 2022) on the inverted trajectory, as the null-text paper compares (section 5.2).

Instead of noising the input with a fresh draw, start from the reconstruction's own latent at the
level given by ``strength`` (a fraction of the S steps: strength 1 starts from z*_T, 0 returns the
reconstruction), and sample the remaining steps with the target prompt and the per-step null
embeddings null_i of the inversion. ``source="pivot"`` starts from the DDIM pivot instead, when
the inversion record still holds it (artifacts do not store it).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from nulltext.diffusion import Diffusion
from nulltext.editing.errors import EditError
from nulltext.editing.sampling import EditOutput, check_inversion, sample_prompts
from nulltext.methods.base import Inversion
from nulltext.reconstruction import reconstruct, to_uint8


def start_step(strength: float, num_steps: int) -> int:
    """Index of the first re-sampled step: S - round(strength * S)."""
    if not 0.0 <= strength <= 1.0:
        raise EditError(f"strength must be in [0, 1], not {strength}")
    return num_steps - round(strength * num_steps)


@torch.no_grad()
def sdedit(
    diffusion: Diffusion,
    inversion: Inversion,
    target_prompts: Sequence[str],
    strength: float = 0.6,
    guidance_scale: float | None = None,
    source: Literal["reconstruction", "pivot"] = "reconstruction",
) -> EditOutput:
    """Row 0: the reconstruction; rows 1..K: SDEdit of each target prompt from step ``S - round(strength S)``."""
    check_inversion(inversion)
    w = inversion.guidance_scale if guidance_scale is None else float(guidance_scale)
    steps = diffusion.schedule.num_steps
    first = start_step(float(strength), steps)
    recon = reconstruct(diffusion, inversion, w)
    if source == "pivot":
        if inversion.pivot is None:
            raise EditError("source='pivot' needs an inversion that kept its pivot (artifacts do not store it)")
        z_start = inversion.pivot[:, steps - first]  # pivot index k holds the level after k inversion steps
    elif source == "reconstruction":
        z_start = recon.trajectory[:, first]  # trajectory index i: after i sampling steps
    else:
        raise EditError(f"unknown SDEdit source {source!r}; use 'reconstruction' or 'pivot'")
    prompts = [inversion.prompts[0], *target_prompts]
    if target_prompts:
        targets = diffusion.encode_text(list(target_prompts)).unsqueeze(1)
        latents = sample_prompts(diffusion, z_start.to(diffusion.device), inversion.uncond, targets, w, start=first)
        latents = torch.cat([recon.latents, latents])
    else:
        latents = recon.latents
    images = torch.cat([recon.images, to_uint8(diffusion.decode(latents[1:]))]) if target_prompts else recon.images
    return EditOutput(
        images=images.cpu(),
        latents=latents.cpu(),
        prompts=prompts,
        settings={"mode": "sdedit", "strength": float(strength), "start_step": first, "source": source, "guidance_scale": w},
    )
