"""Batched guided sampling of several prompts from one inversion, and the edited batch it gives.

Shared by Prompt-to-Prompt (:mod:`nulltext.editing.edit`) and SDEdit (:mod:`nulltext.editing.sdedit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion, SamplingHooks, step_embedding
from nulltext.editing.attention import AttentionController
from nulltext.editing.errors import EditError
from nulltext.methods import Inversion, method_class


@dataclass
class EditOutput:
    """The edited batch: row 0 is the source reconstruction, rows 1..K the edits, in prompt order."""

    images: Tensor  # uint8 [1+K, 3, H, W]
    latents: Tensor  # final latents [1+K, C, h, w]
    prompts: list[str]  # [source, *targets]
    masks: Tensor | None = None  # local blend: float {0,1} [K, 1, H, W], 1 = where the edit may change pixels
    latent_masks: Tensor | None = None  # the same at latent resolution [K, 1, h, w]
    settings: dict = field(default_factory=dict)


def check_inversion(inversion: Inversion) -> None:
    """Refuse inversions that cannot be edited: a method without Prompt-to-Prompt sampling, no
    embeddings (VAE reconstruction) or more than one image."""
    method = method_class(inversion.method)
    if not method.editable:
        raise EditError(f"{method.name} inversions cannot be edited here ({method.edit_instead})")
    if inversion.uncond is None or inversion.cond is None:
        raise EditError("this inversion has no embeddings (a VAE reconstruction); only sampled inversions can be edited")
    if inversion.z_T.shape[0] != 1:
        raise EditError(f"edit one image at a time (inversion.select(b)); this inversion holds {inversion.z_T.shape[0]}")


@torch.no_grad()
def sample_prompts(
    diffusion: Diffusion,
    z: Tensor,
    uncond: Tensor,
    conds: Tensor,
    guidance_scale: float,
    controller: AttentionController | None = None,
    start: int = 0,
    hooks: SamplingHooks | None = None,
) -> Tensor:
    """Guided DDIM sampling of P prompts from ``z`` [1|P, C, h, w], steps ``start``..S-1.

    ``uncond`` [1|P, S|1, L, D]: one for every prompt, or one per prompt; ``conds`` is [P, S|1, L, D]. One UNet
    call per step on ``[z; z]`` with context ``[null_i x P; C_1..C_P]`` (Diffusion.guided_output's
    layout), the inversion method's ``hooks`` (its guidance rule and its correction after the
    step, e.g. direct inversion's offsets), then the controller's step callback (local blend).
    Returns the final latents [P, ...].
    """
    hooks = hooks or SamplingHooks(conds.shape[0])
    prompts = conds.shape[0]
    z = z.expand(prompts, *z.shape[1:]).clone()
    uncond, conds = uncond.to(z.device), conds.to(z.device)
    for i in range(start, diffusion.schedule.num_steps):
        t = diffusion.timesteps[i]
        u = step_embedding(uncond, i).expand(prompts, -1, -1)
        c = step_embedding(conds, i)
        if controller is not None:
            controller.begin_step(i)
        out_u, out_c = diffusion.model_output(torch.cat([z, z]), t, torch.cat([u, c])).chunk(2)
        z = hooks.after_step(i, diffusion.schedule.denoise_step(hooks.guide(i, out_u, out_c, guidance_scale), t, z))
        if controller is not None:
            z = controller.step_callback(z)
            controller.end_step()
    return z
