"""Model families behind one seam: each family's text conditioning, denoiser call and sampler.

:class:`~nulltext.diffusion.Diffusion` reaches a model only through its :class:`Family`, so that
inversion methods stay family-agnostic: a prompt's embedding (its "context") is one tensor [L, D],
classifier-free guidance combines two outputs of the denoiser, and a schedule steps latents both ways.

====== ============================ ================================================ ==========================
family pipeline                     context (real model sizes)                       sampler
====== ============================ ================================================ ==========================
sd     StableDiffusionPipeline      CLIP's last hidden state [77, 768 or 1024]       DDIM
sdxl   StableDiffusionXLPipeline    CLIP-L and CLIP-G penultimate states side by     DDIM
                                    side [77, 2048]; pooled CLIP-G projection [1280];
                                    size/crop time ids from the image size
sd3    StableDiffusion3Pipeline     CLIP-L and CLIP-G penultimate states (padded to  rectified-flow Euler,
                                    T5's width) then T5's states [77+256, 4096];     shift 3
                                    zeros in T5's place without T5; pooled CLIP-L +
                                    CLIP-G projections [2048]
flux   FluxPipeline                 T5's states [512, 4096]; pooled CLIP-L [768];    rectified-flow Euler,
                                    guidance distilled into the model: no            resolution-dependent
                                    unconditional branch                             shift
====== ============================ ================================================ ==========================

A family with a pooled embedding keeps it in the context's LAST row, zero-padded to D (:func:`pack`).
A method that optimises or swaps embeddings thus handles the sequence and the pooled vector alike:
null-text on SDXL optimises one null embedding AND one pooled null embedding per step, as one
tensor (Adam is elementwise, so one parameter equals two; the padding gets no gradient and stays 0).

Each family's encoding and denoiser call transcribe its diffusers pipeline (file and lines of
diffusers 0.42.1 cited next to the code); ``tests/test_families.py`` checks sampling from a given
z_T against the stock pipelines on tiny models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from nulltext.ddim import DDIMSchedule
from nulltext.errors import UnknownNameError
from nulltext.flow import FlowSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What settings must fit in a model, known from its config files before any weights load."""

    vae_factor: int  # image sides must be multiples of it (the VAE's downsampling, times SD3's patch or FLUX's packing)
    resolution: int  # the image side it was trained at
    max_steps: int  # the most sampling steps: training timesteps less the offset of the first one
    family: str = "sd"  # a FAMILIES key


def pack(sequence: Tensor, pooled: Tensor) -> Tensor:
    """[B, L, D] and [B, P] (P <= D) -> one context [B, L+1, D] whose last row is the pooled vector, zero-padded."""
    if pooled.shape[-1] > sequence.shape[-1]:
        raise ValueError(f"a pooled embedding of width {pooled.shape[-1]} does not fit in a context of width {sequence.shape[-1]}")
    return torch.cat([sequence, F.pad(pooled, (0, sequence.shape[-1] - pooled.shape[-1])).unsqueeze(1)], dim=1)


def unpack(context: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack`: (sequence [B, L, D], pooled [B, P])."""
    return context[:, :-1], context[:, -1, :pooled_dim]


def token_ids(tokenizer, prompts: Sequence[str], max_length: int) -> Tensor:
    """Token ids padded to ``max_length`` (the pipelines' tokenizer call), with a warning for each truncated prompt."""
    for prompt in prompts:
        n = len(tokenizer(prompt).input_ids)
        if n > max_length:
            log.warning("caption has %d tokens; truncated to %d: %r", n, max_length, prompt)
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def time_input(t, z: Tensor) -> Tensor:
    """A flow transformer's time input: ``t`` (a number or 0-dim tensor) as float32 for every row of ``z``."""
    return torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0])


class Family:
    """One model family: how its pipeline conditions and calls the denoiser, and which sampler it uses.

    Built around a loaded pipeline (never builds one); ``Diffusion`` holds one.
    """

    name: ClassVar[str]
    pipeline: ClassVar[type[DiffusionPipeline]]
    denoiser_name: ClassVar[str] = "unet"
    # The sampler its schedule steps, by name (the reasons of nulltext.methods.not_applicable_reason).
    sampler: ClassVar[str] = "DDIM"
    # False for FLUX: guidance is an input of the model, there is no unconditional branch to combine.
    classifier_free: ClassVar[bool] = True

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The pipeline's networks by component name (absent optional ones, such as SD3's T5, left out)."""
        return {name: m for name, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)}

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """The context [B, L, D] of each prompt, as the family's pipeline computes it."""
        raise NotImplementedError

    def null_text(self) -> Tensor:
        """The unconditional context [1, L, D] the stock pipeline samples with when given no negative prompt."""
        return self.encode_text([""])

    def forward(self, net: torch.nn.Module, z: Tensor, t, context: Tensor, guidance: float) -> Tensor:
        """The denoiser ``net`` (the pipeline's, or a compiled wrapper of it) on latents ``z`` [B, C, h, w] at ``t``.

        ``guidance`` matters only to guidance-distilled models (FLUX-dev); the others combine two calls.
        """
        raise NotImplementedError

    def sampler_config(self) -> str:
        """The sampler settings its model configs pick (``conf/diffusion/<name>.yaml``; the API's defaults)."""
        return "ddim50"

    def schedule(self, num_steps: int, resolution: int) -> DDIMSchedule | FlowSchedule:
        """The sampler's schedule for ``num_steps`` steps on square images of ``resolution`` pixels."""
        return DDIMSchedule.from_scheduler_config(self.pipe.scheduler.config, num_steps)

    @property
    def schedule_depends_on_resolution(self) -> bool:
        """Whether the schedule shifts with the image size (FLUX-dev's ``use_dynamic_shifting``)."""
        return bool(self.pipe.scheduler.config.get("use_dynamic_shifting", False))

    @classmethod
    def shape(cls, denoiser: dict, vae: dict, scheduler: dict) -> ModelShape:
        """What settings must fit, from the component configs (before any weights load)."""
        factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)  # diffusers' vae_scale_factor rule
        max_steps = int(scheduler.get("num_train_timesteps", 1000)) - int(scheduler.get("steps_offset", 0))
        return ModelShape(factor, int(denoiser.get("sample_size") or 64) * factor, max_steps, cls.name)


class StableDiffusion(Family):
    """SD 1.x and 2.x: one CLIP text encoder, an epsilon or v UNet, DDIM (ALGORITHM.md sections 1-3)."""

    name = "sd"
    pipeline = StableDiffusionPipeline

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """psi(prompt): the text encoder's full output sequence, padded to the context length."""
        ids = token_ids(self.pipe.tokenizer, prompts, self.pipe.tokenizer.model_max_length)
        return self.pipe.text_encoder(ids.to(self.denoiser.device))[0]

    def forward(self, net, z, t, context, guidance):
        return net(z, t, encoder_hidden_states=context).sample


class StableDiffusionXL(Family):
    """SDXL: two CLIP encoders, a pooled embedding and size/crop time ids; an epsilon UNet; DDIM."""

    name = "sdxl"
    pipeline = StableDiffusionXLPipeline

    @property
    def pooled_dim(self) -> int:
        return self.pipe.text_encoder_2.config.projection_dim

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        # diffusers pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py, encode_prompt (lines 369-421):
        # both encoders' penultimate hidden states side by side; the pooled output is the first 2-D one
        # (CLIP-G's projection; CLIP-L's first output is its 3-D last state).
        sequences, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            out = encoder(token_ids(tokenizer, prompts, tokenizer.model_max_length).to(self.denoiser.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            sequences.append(out.hidden_states[-2])
        return pack(torch.cat(sequences, dim=-1), pooled)

    def null_text(self) -> Tensor:
        # encode_prompt lines 423-427: with no negative prompt SDXL base samples with zeros
        # (force_zeros_for_empty_prompt), sequence and pooled alike.
        context = self.encode_text([""])
        return torch.zeros_like(context) if self.pipe.config.force_zeros_for_empty_prompt else context

    def forward(self, net, z, t, context, guidance):
        # __call__ lines 1126-1157 and 1208-1221: time ids (original size, crop top-left, target size)
        # = (H, W, 0, 0, H, W) for an uncropped image of H x W pixels.
        sequence, pooled = unpack(context, self.pooled_dim)
        height, width = (side * self.pipe.vae_scale_factor for side in z.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=sequence.dtype, device=z.device).expand(z.shape[0], 6)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return net(z, t, encoder_hidden_states=sequence, added_cond_kwargs=added).sample


class StableDiffusion3(Family):
    """SD3: CLIP-L, CLIP-G and (optionally) T5, a pooled embedding; an MMDiT velocity model; rectified-flow Euler."""

    name = "sd3"
    pipeline = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    sampler = "rectified-flow Euler"
    # StableDiffusion3Pipeline.__call__'s max_sequence_length
    T5_LENGTH = 256

    def sampler_config(self) -> str:
        return "flow_sd3"

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        # diffusers pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py, encode_prompt (lines 429-464)
        # with _get_clip_prompt_embeds (289-342) and _get_t5_prompt_embeds (233-287); the negative prompt is "" (467).
        pipe, device = self.pipe, self.denoiser.device
        sequences, pooled = [], []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            out = encoder(token_ids(tokenizer, prompts, pipe.tokenizer_max_length).to(device), output_hidden_states=True)
            pooled.append(out[0])
            sequences.append(out.hidden_states[-2])
        if pipe.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.T5_LENGTH, self.denoiser.config.joint_attention_dim, device=device)
        else:
            t5 = pipe.text_encoder_3(token_ids(pipe.tokenizer_3, prompts, self.t5_length).to(device))[0]
        clip = torch.cat(sequences, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return pack(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    @property
    def t5_length(self) -> int:
        """T5 tokens: the pipeline's 256, or fewer when the tokenizer holds fewer (the tiny test models)."""
        return min(self.T5_LENGTH, self.pipe.tokenizer_3.model_max_length)

    def forward(self, net, z, t, context, guidance):
        # __call__ lines 1066-1081: the time input is the scheduler's timestep (1000 sigma) per row.
        sequence, pooled = unpack(context, self.denoiser.config.pooled_projection_dim)
        return net(hidden_states=z, timestep=time_input(t, z), encoder_hidden_states=sequence, pooled_projections=pooled).sample

    def schedule(self, num_steps: int, resolution: int) -> FlowSchedule:
        # __call__ lines 1014-1041: the config's shift; mu from the token count only with dynamic shifting.
        config = self.pipe.scheduler.config
        mu = None
        if self.schedule_depends_on_resolution:
            tokens = (resolution // self.pipe.vae_scale_factor // self.denoiser.config.patch_size) ** 2
            mu = calculate_shift(
                tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.16)
            )
        return FlowSchedule.from_scheduler_config(config, num_steps, mu=mu)

    @classmethod
    def shape(cls, denoiser: dict, vae: dict, scheduler: dict) -> ModelShape:
        shape = super().shape(denoiser, vae, scheduler)
        # Image sides are multiples of the VAE factor times the transformer's patch (pipeline check_inputs).
        return ModelShape(shape.vae_factor * int(denoiser.get("patch_size", 2)), shape.resolution, shape.max_steps, cls.name)


class Flux(Family):
    """FLUX.1: CLIP-L pooled + T5; a guidance-distilled velocity transformer on 2x2-packed latents; rectified-flow Euler.

    Its null text (the empty prompt's context, what FluxPipeline's optional true CFG would use) is
    kept in inversions so that their record has one form in every family; FLUX sampling never reads it.
    """

    name = "flux"
    pipeline = FluxPipeline
    denoiser_name = "transformer"
    sampler = "rectified-flow Euler"
    classifier_free = False
    # FluxPipeline.__call__'s max_sequence_length
    T5_LENGTH = 512


    def sampler_config(self) -> str:
        # FLUX.1-schnell has no guidance input (timestep-distilled, 4 steps); FLUX.1-dev takes one.
        return "flow_flux_dev" if self.denoiser.config.guidance_embeds else "flow_flux_schnell"

    @property
    def t5_length(self) -> int:
        """T5 tokens: the pipeline's 512, or fewer when the tokenizer holds fewer (the tiny test models)."""
        return min(self.T5_LENGTH, self.pipe.tokenizer_2.model_max_length)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        # diffusers pipelines/flux/pipeline_flux.py, encode_prompt (lines 312-389): CLIP-L's pooled output
        # (_get_clip_prompt_embeds, 267-310) and T5's last hidden state (_get_t5_prompt_embeds, 217-265).
        pipe, device = self.pipe, self.denoiser.device
        pooled = pipe.text_encoder(token_ids(pipe.tokenizer, prompts, pipe.tokenizer_max_length).to(device), output_hidden_states=False).pooler_output
        t5 = pipe.text_encoder_2(token_ids(pipe.tokenizer_2, prompts, self.t5_length).to(device), output_hidden_states=False)[0]
        return pack(t5, pooled)

    def forward(self, net, z, t, context, guidance):
        # __call__ lines 847-911 with _prepare_latent_image_ids / _pack_latents / _unpack_latents
        # (508-543): 2x2 patches of the latent as tokens, their (0, row, column) ids, zero text ids,
        # time input t / 1000, the guidance scale as an input of guidance-distilled models.
        sequence, pooled = unpack(context, self.denoiser.config.pooled_projection_dim)
        b, c, h, w = z.shape
        tokens = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        text_ids = torch.zeros(sequence.shape[1], 3, device=z.device, dtype=z.dtype)
        scale = torch.full([1], guidance, device=z.device, dtype=torch.float32).expand(b) if self.denoiser.config.guidance_embeds else None
        out = net(
            hidden_states=tokens,
            timestep=time_input(t, z) / 1000,
            guidance=scale,
            pooled_projections=pooled,
            encoder_hidden_states=sequence,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def schedule(self, num_steps: int, resolution: int) -> FlowSchedule:
        # __call__ lines 823-842: sigmas linspace(1, 1/S, S), shifted by mu from the image's token count.
        config = self.pipe.scheduler.config
        tokens = (resolution // self.pipe.vae_scale_factor // 2) ** 2
        mu = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        )
        return FlowSchedule.from_scheduler_config(config, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    @classmethod
    def shape(cls, denoiser: dict, vae: dict, scheduler: dict) -> ModelShape:
        factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
        # FluxPipeline's default size is 128 latents a side (1024 px), the VAE's sample_size; sides are
        # multiples of twice the VAE factor (2x2 packing).
        resolution = int(vae.get("sample_size") or 128 * factor)
        return ModelShape(2 * factor, resolution, int(scheduler.get("num_train_timesteps", 1000)), cls.name)


FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)}


def family_of(pipe: DiffusionPipeline) -> Family:
    """The :class:`Family` of a loaded pipeline."""
    for cls in FAMILIES.values():
        if isinstance(pipe, cls.pipeline):
            return cls(pipe)
    raise UnknownNameError(f"nulltext does not run {type(pipe).__name__}: it runs {supported_pipelines()}")


def family_class(pipeline_class_name: str, where: str) -> type[Family]:
    """The family of a pipeline class named in a model_index.json (``where`` names the model in the error)."""
    for cls in FAMILIES.values():
        if cls.pipeline.__name__ == pipeline_class_name:
            return cls
    raise UnknownNameError(f"model {where} is a {pipeline_class_name}: nulltext runs {supported_pipelines()}")


def supported_pipelines() -> str:
    return ", ".join(cls.pipeline.__name__ for cls in FAMILIES.values())
