"""Methods without optimisation: the VAE upper bound, DDIM and flow inversion, and negative-prompt inversion."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor


class VAEReconstruction(InversionMethod):
    """Upper bound: decode(encode(x)); no diffusion at all."""

    name = "vae"
    families = ("sd", "sdxl", "sd3", "flux")

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        return Inversion(z_T=z0, uncond=None, cond=None, prompts=prompts, guidance_scale=0.0, iterations=[0] * len(prompts))


class DDIMInversion(InversionMethod):
    """Lower bound: the w = 1 pivot's z*_T, sampled at w = 7.5 with psi("") (ALGORITHM.md section 6).

    By default it also reports sampling at w = 1, which retraces the pivot up to DDIM's error.
    """

    name = "ddim"
    families = ("sd", "sdxl")

    def __init__(self, extra_guidance_scales: Sequence[float] = (1.0,)):
        super().__init__(extra_guidance_scales)

    def embeddings(self, diffusion: Diffusion, cond: Tensor) -> Tensor:
        """The unconditional embedding used at every step when sampling."""
        return diffusion.null_text().expand_as(cond)

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond = diffusion.encode_text(prompts)
        pivot = diffusion.ddim_inversion(z0, cond)
        return self.pivot_record(pivot, self.embeddings(diffusion, cond), cond, prompts, diffusion.guidance_scale)


class NegativePromptInversion(DDIMInversion):
    """Negative-prompt inversion (Miyake et al. 2023): the null embedding := psi(prompt) at every step.

    No optimisation; guidance then has no effect, so sampling retraces the w = 1 pivot.
    """

    name = "negative_prompt"

    def __init__(self, extra_guidance_scales: Sequence[float] = ()):
        super().__init__(extra_guidance_scales)

    def embeddings(self, diffusion: Diffusion, cond: Tensor) -> Tensor:
        return cond


class FlowInversion(DDIMInversion):
    """Plain flow inversion (reverse Euler) for the rectified-flow families, SD3 and FLUX.

    The flow counterpart of DDIM inversion: the Euler step of the model's sampler run backwards
    from z_0 with the velocity at w = 1 (:mod:`nulltext.flow`; FLUX: guidance input 1), its z_T
    sampled forwards at the sampler's w with psi(""), and by default also at w = 1, which retraces
    the inversion up to the Euler steps' error.
    """

    name = "flow_inversion"
    families = ("sd3", "flux")
