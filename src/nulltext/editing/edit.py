"""Editing a saved inversion: Prompt-to-Prompt (and SDEdit) with z_T and the per-step null embeddings.

ALGORITHM.md section 5: the batch is [source prompt, target prompts], all starting from z*_T; at
step i the context is [null_i for every prompt; C_prompt], guidance w (7.5); attention controllers
edit only the conditional half and never the source row, so row 0 is the source reconstruction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.diffusion import Diffusion, SamplingHooks, step_embedding
from nulltext.editing.attention import (
    AttentionController,
    AttentionRefine,
    AttentionReplace,
    AttentionReweight,
    ControllerGroup,
    CrossWindow,
    LocalBlend,
    Window,
    attention_control,
)
from nulltext.editing.errors import EditError
from nulltext.methods import Inversion, method_class
from nulltext.reconstruction import to_uint8

MODES = ("replace", "refine", "reweight", "sdedit", "none")


@dataclass
class EditSettings:
    """What an edit does (the ``nulltext edit`` config keys of the same names).

    mode: ``replace`` (word swap), ``refine`` (added words), ``reweight`` (scale words), ``sdedit``
        or ``none`` (plain sampling of every prompt from z_T with null_i: no attention control).
    cross_replace: cross-attention injection window (fraction of steps, (start, end) pair, or a
        dict word -> window with an optional ``default_``).
    self_replace: self-attention injection window (fraction or pair; 0 disables).
    reweight: ``{word: factor}`` for the target prompts; with mode replace/refine it is applied on
        top of that controller, with mode reweight alone.
    blend_words: local blend words (``[source_word, target_word]``, one entry per prompt, or a
        single word); None disables local blending.
    blend_threshold, blend_start: the local blend's mask threshold and first step (fraction).
    blend_resolution: side of the cross-attention maps the local-blend mask is made from; None: the
        side nearest a quarter of the latent side (16 on SD, as the official code); small models
        need a finer one (8 on the pocket model's 8x8 latents, where a quarter is a 4x4 map).
    strength: SDEdit's fraction of the steps that are re-sampled with the target prompt.
    """

    mode: str = "replace"
    cross_replace: CrossWindow = 0.8
    self_replace: Window | None = 0.4
    reweight: Mapping[str, float] | None = None
    blend_words: Any = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    blend_resolution: int | None = None
    self_replace_max_tokens: int = 16**2
    strength: float = 0.6

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EditSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise EditError(f"unknown edit setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        settings = cls(**dict(values))
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.mode not in MODES:
            raise EditError(f"unknown edit mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "reweight" and not self.reweight:
            raise EditError("mode=reweight needs reweight={word: factor}")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise EditError(f"strength must be in [0, 1], not {self.strength}")
        if self.mode == "sdedit" and (self.blend_words is not None or self.reweight):
            raise EditError("mode=sdedit uses no attention control: drop blend_words and reweight, or pick another mode")
        if not 0.0 <= float(self.blend_start) <= 1.0:
            raise EditError(f"blend_start must be in [0, 1], not {self.blend_start}")
        if self.blend_resolution is not None and int(self.blend_resolution) < 1:
            raise EditError(f"blend_resolution must be a positive map side (e.g. 16) or null, not {self.blend_resolution}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EditOutput:
    """The edited batch: row 0 is the source reconstruction, rows 1..K the edits, in prompt order."""

    images: Tensor  # uint8 [1+K, 3, H, W]
    latents: Tensor  # final latents [1+K, C, h, w]
    prompts: list[str]  # [source, *targets]
    masks: Tensor | None = None  # local blend: float {0,1} [K, 1, H, W], 1 = where the edit may change pixels
    latent_masks: Tensor | None = None  # the same at latent resolution [K, 1, h, w]
    settings: dict = field(default_factory=dict)


def build_controller(settings: EditSettings) -> AttentionController | None:
    """The controller stack for ``settings`` (None for modes ``none`` and ``sdedit``)."""
    settings.validate()
    if settings.mode in ("none", "sdedit"):
        if settings.blend_words is not None and settings.mode == "none":
            return ControllerGroup(_local_blend(settings))
        return None
    windows = dict(
        cross_replace=settings.cross_replace,
        self_replace=settings.self_replace,
        self_replace_max_tokens=settings.self_replace_max_tokens,
    )
    if settings.mode == "replace":
        main: AttentionController = AttentionReplace(**windows)
    elif settings.mode == "refine":
        main = AttentionRefine(**windows)
    else:
        main = AttentionReweight(settings.reweight, **windows)
    if settings.reweight and settings.mode != "reweight":
        main = AttentionReweight(settings.reweight, prev=main, **windows)
    # Observers first: the local blend must see the target's own maps, before injection.
    blend = _local_blend(settings) if settings.blend_words is not None else None
    return ControllerGroup(blend, main)


def _local_blend(settings: EditSettings) -> LocalBlend:
    side = settings.blend_resolution
    return LocalBlend(
        settings.blend_words,
        threshold=settings.blend_threshold,
        start=settings.blend_start,
        queries=None if side is None else int(side) ** 2,
    )


def _check_inversion(inversion: Inversion) -> None:
    method = method_class(inversion.method)
    if not method.editable:
        raise EditError(f"{method.name} inversions cannot be edited here ({method.edit_instead})")
    if inversion.uncond is None or inversion.cond is None:
        raise EditError("this inversion has no embeddings (a VAE reconstruction); only sampled inversions can be edited")
    if inversion.z_T.shape[0] != 1:
        raise EditError(f"edit one image at a time (inversion.select(b)); this inversion holds {inversion.z_T.shape[0]}")


def prompt_conditions(diffusion: Diffusion, inversion: Inversion, target_prompts: Sequence[str]) -> Tensor:
    """[P, S|1, L, D]: the source row's own (possibly per-step) condition, then psi(target) per target."""
    source = inversion.cond.to(diffusion.device)
    if not target_prompts:
        return source
    targets = diffusion.encode_text(list(target_prompts)).unsqueeze(1)  # [K, 1, L, D]
    return torch.cat([source, targets.expand(-1, source.shape[1], -1, -1)])


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

    ``uncond`` [1, S|1, L, D] is broadcast to every prompt; ``conds`` is [P, S|1, L, D]. One UNet
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


def upsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(mask.float(), size=size, mode="nearest")


@torch.no_grad()
def edit(
    diffusion: Diffusion,
    inversion: Inversion,
    target_prompts: Sequence[str],
    controller_settings: EditSettings | Mapping[str, Any] | AttentionController | None = None,
    guidance_scale: float | None = None,
) -> EditOutput:
    """Edit one inverted image with Prompt-to-Prompt (or SDEdit, ``mode="sdedit"``).

    ``controller_settings``: :class:`EditSettings` (or a dict of its fields), a ready
    :class:`AttentionController` (e.g. an :class:`~nulltext.editing.attention.AttentionStore` or a
    :class:`ControllerGroup`), or None for plain batched sampling without attention control.
    """
    _check_inversion(inversion)
    controller: AttentionController | None
    settings: EditSettings | None = None
    if isinstance(controller_settings, AttentionController):
        controller = controller_settings
    else:
        if controller_settings is not None:
            settings = controller_settings if isinstance(controller_settings, EditSettings) else EditSettings.from_dict(controller_settings)
            if settings.mode == "sdedit":
                from nulltext.editing.sdedit import sdedit

                return sdedit(diffusion, inversion, target_prompts, settings.strength, guidance_scale=guidance_scale)
        controller = build_controller(settings) if settings is not None else None
    w = inversion.guidance_scale if guidance_scale is None else float(guidance_scale)
    prompts = [inversion.prompts[0], *target_prompts]
    z_T = inversion.z_T.to(diffusion.device)
    conds = prompt_conditions(diffusion, inversion, target_prompts)
    hooks = method_class(inversion.method).sampling_hooks(diffusion, inversion, rows=len(prompts))
    if controller is None:
        latents = sample_prompts(diffusion, z_T, inversion.uncond, conds, w, hooks=hooks)
    else:
        controller.prepare(prompts, diffusion.tokenizer, diffusion.schedule.num_steps, tuple(z_T.shape[-2:]))
        with attention_control(diffusion.unet, controller):
            latents = sample_prompts(diffusion, z_T, inversion.uncond, conds, w, controller, hooks=hooks)
    images = to_uint8(diffusion.decode(latents))
    blend = ControllerGroup(controller).find(LocalBlend) if controller is not None else None
    latent_masks = masks = None
    if blend is not None and blend.mask is not None:
        latent_masks = blend.mask[1:].cpu()
        masks = upsample_mask(latent_masks, tuple(images.shape[-2:]))
    return EditOutput(
        images=images.cpu(),
        latents=latents.cpu(),
        prompts=prompts,
        masks=masks,
        latent_masks=latent_masks,
        settings={"guidance_scale": w, **(settings.to_dict() if settings else {"controller": type(controller).__name__ if controller else None})},
    )
