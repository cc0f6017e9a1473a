"""The pieces of a text-to-image pipeline that inversion needs, batched and float32.

``Diffusion`` wraps a diffusers pipeline (components passed in, never built here) with the
conventions of the official null-text code (ALGORITHM.md sections 1-3, 5): VAE posterior mean
times the scaling factor, text embeddings as the full encoder output, classifier-free guidance
with the unconditional half first, and a deterministic sampler in both directions. What differs
between model families -- text conditioning, the denoiser's call, the sampler (DDIM for SD 1/2 and
SDXL, rectified-flow Euler for SD3 and FLUX) -- is behind :class:`nulltext.families.Family`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from nulltext.ddim import split_model_output
from nulltext.families import family_of
from nulltext.models import pipeline_shape
from nulltext.validation import SettingError, check_choice, check_float, check_int

InversionTimestep = Literal["target", "source"]


class Diffusion:
    """Batched encode / decode / denoiser / sampler helpers around one pipeline.

    Args:
        pipe: a (frozen) pipeline of a family in :data:`nulltext.families.FAMILIES`.
        num_inference_steps: sampler steps (50 in the paper).
        guidance_scale: classifier-free guidance w used for reconstruction and editing (7.5); for
            guidance-distilled FLUX the guidance input of the model.
        inversion_timestep: "target" evaluates the denoiser at the destination timestep t on the
            source latent z_{t-k}, as the official code does; "source" uses the source timestep
            t-k, as the paper's equation is written (clamped at 0 for the first step) and as the
            flow-inversion literature evaluates its velocity.
        resolution: the image side the schedule is set up for (FLUX shifts its schedule with the
            image's token count); None: the model's own resolution.

    ``unet`` is the denoiser: the UNet, or the transformer of SD3 and FLUX (metrics count its
    rows as "UNet evaluations" in every family).
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        inversion_timestep: InversionTimestep = "target",
        resolution: int | None = None,
    ):
        shape = pipeline_shape(pipe)
        num_inference_steps, guidance_scale, inversion_timestep = self.check_settings(
            num_inference_steps, guidance_scale, inversion_timestep, shape.max_steps
        )
        self.pipe = pipe
        self.family = family_of(pipe)
        self.unet, self.vae, self.text_encoder, self.tokenizer = self.family.denoiser, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.resolution = shape.resolution if resolution is None else resolution
        self.schedule = self.family.schedule(num_inference_steps, self.resolution)
        self.guidance_scale = guidance_scale
        self.inversion_timestep = inversion_timestep

    @staticmethod
    def check_settings(
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        inversion_timestep: InversionTimestep = "target",
        max_steps: int = 999,
    ) -> tuple[int, float, InversionTimestep]:
        """The sampler's settings checked (:class:`~nulltext.validation.SettingError`), before any model loads.

        Steps are 1 .. ``max_steps``: the model's training timesteps less the first one's offset (999
        on SD, whose timesteps start at 1: a DDIM step spans at least one training timestep). Any
        finite guidance scale is allowed (0 = unconditional, 1 = conditional only, < 0 = negative
        guidance).
        """
        return (
            check_int("diffusion.num_inference_steps", num_inference_steps, 1, max_steps),
            check_float("diffusion.guidance_scale", guidance_scale),
            check_choice("diffusion.inversion_timestep", inversion_timestep, ("target", "source")),
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """Every network of the pipeline by component name, the denoiser as ``unet`` (for device placement)."""
        modules = self.family.modules()
        modules.pop(self.family.denoiser_name)
        return {"unet": self.unet, **modules}

    @property
    def timesteps(self) -> tuple[int, ...]:
        return self.schedule.timesteps

    # -- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """psi(prompt): the family's context [B, L, D] (SD: the text encoder's full output sequence, padded)."""
        return self.family.encode_text(prompts)

    @torch.no_grad()
    def null_text(self) -> Tensor:
        """psi(""): the unconditional context [1, L, D] of the stock pipeline (zeros on SDXL base)."""
        return self.family.null_text()

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(psi(prompts), psi("") expanded to the same shape): the two embeddings of guided sampling."""
        cond = self.encode_text(prompts)
        return cond, self.null_text().expand_as(cond)

    # -- images -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 [B,3,H,W] -> latents: VAE posterior MEAN (not a sample), less the VAE's shift (SD3, FLUX), times its scaling factor."""
        x = images.to(self.device, torch.float32) / 127.5 - 1
        mean = self.vae.encode(x).latent_dist.mean
        shift = self.vae.config.get("shift_factor")
        return (mean if shift is None else mean - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], float32 [B,3,H,W]."""
        latents = latents / self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor")
        x = self.vae.decode(latents if shift is None else latents + shift).sample
        return (x / 2 + 0.5).clamp(0, 1)

    # -- UNet -------------------------------------------------------------------------------
    def model_output(self, z: Tensor, t: int, context: Tensor, guidance: float | None = None) -> Tensor:
        """The denoiser's raw prediction (epsilon, v or flow velocity) for latents ``z`` at timestep ``t``.

        ``guidance`` is the guidance input of guidance-distilled models (FLUX-dev; default: the
        sampler's scale); other families ignore it.
        """
        return self.denoise(self.unet, z, t, context, guidance)

    def denoise(self, net: torch.nn.Module, z: Tensor, t: int, context: Tensor, guidance: float | None = None) -> Tensor:
        """``net`` (the denoiser, or a compiled wrapper of it) through the family's call, in the weights' dtype.

        Latents and context are cast to the denoiser's dtype (differentiably: an optimised float32
        embedding stays a float32 leaf, its gradient float32) and the output back to the latents'
        dtype; with float32 weights and inputs both casts are no-ops.
        """
        dtype = self.unet.dtype
        out = self.family.forward(net, z.to(dtype), t, context.to(dtype), self.guidance_scale if guidance is None else guidance)
        return out.to(z.dtype)

    def guided_output(self, z: Tensor, t: int, uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): out_u + w (out_c - out_u).

        One UNet call on the doubled batch [uncond; cond], as the official sampler does. At w = 1
        the unconditional half cannot matter and is skipped. A guidance-distilled model (FLUX)
        has no unconditional branch: one call on ``cond`` with w as its guidance input.
        """
        if not self.family.classifier_free:
            return self.model_output(z, t, cond, guidance_scale)
        if guidance_scale == 1.0:
            return self.model_output(z, t, cond)
        out_u, out_c = self.model_output(torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
        return guide(out_u, out_c, guidance_scale)

    def noise_estimate(self, z: Tensor, t: int, uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
        """eps_w(z, t): the guided output on ``z`` at ``t`` as a noise estimate (v-prediction converted).

        For methods that move another latent than the one the UNet saw (EDICT, BDIA, fixed point).
        """
        out = self.guided_output(z, t, uncond, cond, guidance_scale)
        return split_model_output(out, z, self.schedule.alpha(t), self.schedule.prediction_type)[1]

    # -- trajectories -----------------------------------------------------------------------
    @torch.no_grad()
    def ddim_inversion(self, z0: Tensor, cond: Tensor, uncond: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
        """DDIM inversion (reverse Euler for flow families): the pivot trajectory [B, S+1, C, h, w], index 0 = z_0, index S = z_T.

        ALGORITHM.md section 3: w = 1 (conditional prediction only) is the paper's pivot; other
        scales exist for the pivot-guidance ablation (paper Fig. 9).
        """
        self.check_latents(z0)
        latents = [z0]
        z = z0
        for t in reversed(self.timesteps):
            t_unet = t if self.inversion_timestep == "target" else self.schedule.source_timestep(t)
            out = self.guided_output(z, t_unet, uncond, cond, guidance_scale)
            z = self.schedule.invert_step(out, t, z)
            latents.append(z)
        return torch.stack(latents, dim=1)

    @torch.no_grad()
    def sample(
        self, z_T: Tensor, uncond: Tensor, cond: Tensor, guidance_scale: float | None = None, hooks: "SamplingHooks | None" = None
    ) -> Tensor:
        """Guided DDIM sampling from z_T; returns the trajectory [B, S+1, C, h, w] (index 0 = z_T).

        ``uncond`` / ``cond`` are [B, S, L, D] (one embedding per step) or [B, 1, L, D] (shared by
        all steps): ALGORITHM.md section 5, with null_i at step i. ``hooks`` replace the guidance
        rule and correct the latents after each step (methods such as direct inversion).
        """
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        self.check_latents(z_T)
        z = z_T
        latents = [z]
        for i, t in enumerate(self.timesteps):
            u, c = step_embedding(uncond, i), step_embedding(cond, i)
            if hooks is None:
                out = self.guided_output(z, t, u, c, w)
            else:
                out = hooks.guide(i, *self.model_output(torch.cat([z, z]), t, torch.cat([u, c])).chunk(2), w)
            z = self.schedule.denoise_step(out, t, z)
            if hooks is not None:
                z = hooks.after_step(i, z)
            latents.append(z)
        return torch.stack(latents, dim=1)

    def check_latents(self, z: Tensor) -> None:
        """Latents of another image size than the schedule was set up for cannot be sampled where the schedule depends on it."""
        side = z.shape[-1] * self.pipe.vae_scale_factor
        if self.family.schedule_depends_on_resolution and side != self.resolution:
            raise SettingError(
                f"the sampler was set up for {self.resolution} px images, these are {side} px: the schedule of "
                f"{type(self.pipe).__name__} shifts with the image size; build Diffusion(..., resolution={side})"
            )

    @contextlib.contextmanager
    def unet_dtype(self, dtype: torch.dtype) -> Iterator[None]:
        """Run the UNet in ``dtype`` (float64 for the exact methods) and restore it afterwards.

        float32 -> float64 -> float32 is lossless, so the weights come back bit for bit.
        """
        original = self.unet.dtype
        if dtype == original:
            yield
            return
        self.unet.to(dtype)
        try:
            yield
        finally:
            self.unet.to(original)


class SamplingHooks:
    """Per-step changes a method makes to guided DDIM sampling, in reconstruction and in editing.

    The batch is B groups of ``rows`` consecutive rows, one group per image: row 0 of a group is
    the image's source row, the others its edits (``rows`` = 1 in reconstruction). The defaults
    are plain classifier-free guidance and no correction.
    """

    def __init__(self, rows: int = 1):
        self.rows = rows

    def guide(self, i: int, out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
        """The guided output of step ``i`` from the two halves of the UNet batch."""
        return guide(out_uncond, out_cond, guidance_scale)

    def after_step(self, i: int, z: Tensor) -> Tensor:
        """The latents after the DDIM step of step ``i`` (before any local blend)."""
        return z

    def groups(self, x: Tensor) -> Tensor:
        """``x`` [B*rows, ...] viewed as [B, rows, ...]."""
        return x.view(-1, self.rows, *x.shape[1:])


def check_sampler_config(config: Mapping[str, Any], max_steps: int) -> None:
    """A ``diffusion`` config node's settings, checked before the model loads (the constructor checks again)."""
    Diffusion.check_settings(**{k: v for k, v in config.items() if not k.startswith("_")}, max_steps=max_steps)


def guide(out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance of two UNet outputs: out_u + w (out_c - out_u)."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def step_embedding(embeddings: Tensor, i: int) -> Tensor:
    """Embedding of step ``i`` from [B, S, L, D] per-step or [B, 1, L, D] shared embeddings."""
    return embeddings[:, i if embeddings.shape[1] > 1 else 0]
