"""Reconstruction from an :class:`Inversion`, and the per-timestep distance to its pivot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.methods import Inversion, method_class


def to_uint8(images: Tensor) -> Tensor:
    """[0,1] floats -> uint8 by truncation, as the official code converts (``astype(np.uint8)``)."""
    return (images * 255).to(torch.uint8)


@dataclass
class Reconstruction:
    images: Tensor  # uint8 [B,3,H,W]
    latents: Tensor  # final latents [B,C,h,w]
    trajectory: Tensor | None  # [B,S+1,C,h,w], index 0 = z_T; None without sampling


@torch.no_grad()
def reconstruct(diffusion: Diffusion, inversion: Inversion, guidance_scale: float | None = None) -> Reconstruction:
    """Sample with the inversion's method (by default guided DDIM from z_T, ALGORITHM.md section 5), decode, quantise.

    Methods that sample in float64 are decoded from float32 latents (the VAE stays float32).
    """
    if inversion.uncond is None:
        return Reconstruction(to_uint8(diffusion.decode(inversion.z_T)), inversion.z_T, None)
    w = inversion.guidance_scale if guidance_scale is None else guidance_scale
    trajectory = method_class(inversion.method).reconstruct(diffusion, inversion, w).float()
    return Reconstruction(to_uint8(diffusion.decode(trajectory[:, -1])), trajectory[:, -1], trajectory)


def latent_errors(trajectory: Tensor, pivot: Tensor) -> Tensor:
    """Mean squared distance [B, S+1] between the sampled trajectory and the pivot, per timestep.

    Column i compares the latent after i sampling steps with the pivot latent of the same level
    (the pivot runs the other way: its index S is z*_T).
    """
    return (trajectory - pivot.flip(1)).pow(2).flatten(2).mean(2)
