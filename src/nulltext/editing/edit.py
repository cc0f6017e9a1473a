"""Editing a saved inversion: Prompt-to-Prompt (and SDEdit) with z_T and the per-step null embeddings.

ALGORITHM.md section 5: the batch is [source prompt, target prompts], all starting from z*_T; at
step i the context is [null_i for every prompt; C_prompt], guidance w (7.5); attention controllers
edit only the conditional half and never the source row, so row 0 is the source reconstruction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.editing.attention import (
    AttentionController,
    AttentionEdit,
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
from nulltext.editing.sampling import EditOutput, check_inversion, sample_prompts
from nulltext.editing.sdedit import sdedit
from nulltext.editing.tokens import context_tokenizer
from nulltext.methods import Inversion, method_class
from nulltext.reconstruction import to_uint8
from nulltext.validation import SettingError, check_choice, check_float, check_int, check_probability, check_text

MODES = ("replace", "refine", "reweight", "sdedit", "none", "flowedit")
TARGET_UNCONDS = ("inversion", "empty")  # EditSettings.target_uncond


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
    target_uncond: the unconditional embeddings of the edited rows. ``inversion`` (Prompt-to-Prompt
        on a null-text inversion as published: every row samples with the inversion's per-step
        embeddings); ``empty``: the edited rows use the model's own null text psi("") instead, the
        source row keeps the inversion's. An option of its own, off by default: where the inversion
        drives its unconditional prediction close to the source's conditional one, as null-text
        does (negative-prompt inversion sets them equal), guidance at w samples the edited rows near
        c_tgt + (w - 1) (c_tgt - c_src), the swap amplified; ``empty`` guides them from psi("")
        as plain sampling does (models/pocket/README.md measures both).
    n_max, n_avg, src_guidance_scale, tar_guidance_scale: FlowEdit's settings (``mode=flowedit``, SD3
        and FLUX: :mod:`nulltext.editing.flowedit`); None: the published value of the model's family.

    Allowed values (:meth:`validate`, one :class:`~nulltext.validation.SettingError` line each):
    windows are fractions in [0, 1] or pairs [start, end] with 0 <= start <= end <= 1;
    ``reweight`` factors are finite numbers (negative ones suppress a word); ``blend_threshold``,
    ``blend_start`` and ``strength`` are in [0, 1]; ``blend_resolution`` >= 1 or null;
    ``self_replace_max_tokens`` >= 0 (0: no self-attention map is replaced).
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
    n_max: int | None = None
    n_avg: int = 1
    src_guidance_scale: float | None = None
    tar_guidance_scale: float | None = None
    target_uncond: str = "inversion"

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
        check_choice("mode", self.mode, MODES)
        if isinstance(self.cross_replace, Mapping):
            for word, window in self.cross_replace.items():
                check_window(f"cross_replace.{check_text('cross_replace word', word)}", window)
        else:
            check_window("cross_replace", self.cross_replace)
        if self.self_replace is not None:
            check_window("self_replace", self.self_replace)
        check_int("self_replace_max_tokens", self.self_replace_max_tokens, 0)
        if self.reweight is not None:
            if not isinstance(self.reweight, Mapping):
                raise SettingError(f"reweight={self.reweight!r} is not allowed: null or {{word: factor}}, e.g. {{cat: 2.0}}")
            for word, factor in self.reweight.items():
                check_float(f"reweight.{check_text('reweight word', word)}", factor)
        if self.mode == "reweight" and not self.reweight:
            raise EditError("mode=reweight needs reweight={word: factor}")
        check_probability("strength", self.strength)
        if self.mode in ("sdedit", "flowedit") and (self.blend_words is not None or self.reweight):
            raise EditError(f"mode={self.mode} uses no attention control: drop blend_words and reweight, or pick another mode")
        check_choice("target_uncond", self.target_uncond, TARGET_UNCONDS)
        if self.mode in ("sdedit", "flowedit") and self.target_uncond != "inversion":
            raise EditError(f"target_uncond={self.target_uncond} applies to Prompt-to-Prompt sampling, not mode={self.mode}")
        if self.n_max is not None:
            check_int("n_max", self.n_max, 0)
        check_int("n_avg", self.n_avg, 1)
        for name in ("src_guidance_scale", "tar_guidance_scale"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name))
        if self.blend_words is not None:
            words = [self.blend_words] if isinstance(self.blend_words, str) else self.blend_words
            entries = [w for entry in words for w in ([entry] if isinstance(entry, str) else entry)] if isinstance(words, Sequence) else []
            if not entries or not all(isinstance(w, str) and w.strip() for w in entries):
                raise SettingError(
                    f"blend_words={self.blend_words!r} is not allowed: null, a word, or [source_word, target_word] "
                    "(one entry, a word or a list of words, per prompt)"
                )
        check_probability("blend_threshold", self.blend_threshold)
        check_probability("blend_start", self.blend_start)
        if self.blend_resolution is not None:
            check_int("blend_resolution", self.blend_resolution, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(EditSettings))  # the config keys of an edit


def row_unconds(diffusion: Diffusion, inversion: Inversion, edits: int, target_uncond: str) -> Tensor:
    """The unconditional embeddings of sample_prompts: the inversion's [1, S|1, L, D] for every row
    (``inversion``), or [1 + edits, S|1, L, D] with psi("") in the edited rows (``empty``)."""
    if target_uncond == "inversion":
        return inversion.uncond
    source = inversion.uncond.to(diffusion.device)
    empty = diffusion.null_text().to(source)[:, None].expand(edits, source.shape[1], -1, -1)
    return torch.cat([source, empty])


def check_window(name: str, window: Any) -> None:
    """An injection window: a fraction of the steps in [0, 1] or a pair [start, end], 0 <= start <= end <= 1."""
    if isinstance(window, Sequence) and not isinstance(window, str) and len(window) == 2:
        start, end = (check_probability(name, bound) for bound in window)
        if start <= end:
            return
    elif not isinstance(window, (Sequence, Mapping)):
        check_probability(name, window)
        return
    raise SettingError(f"{name}={window!r} is not allowed: a fraction in [0, 1] or a pair [start, end] with 0 <= start <= end <= 1")


def build_controller(settings: EditSettings) -> AttentionController | None:
    """The controller stack for ``settings`` (None for modes ``none``, ``sdedit`` and ``flowedit``)."""
    settings.validate()
    if settings.mode in ("none", "sdedit", "flowedit"):
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


def prompt_conditions(diffusion: Diffusion, inversion: Inversion, target_prompts: Sequence[str]) -> Tensor:
    """[P, S|1, L, D]: the source row's own (possibly per-step) condition, then psi(target) per target."""
    source = inversion.cond.to(diffusion.device)
    if not target_prompts:
        return source
    targets = diffusion.encode_text(list(target_prompts)).unsqueeze(1)  # [K, 1, L, D]
    return torch.cat([source, targets.expand(-1, source.shape[1], -1, -1)])


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
    check_inversion(inversion)
    controller: AttentionController | None
    settings: EditSettings | None = None
    if isinstance(controller_settings, AttentionController):
        controller = controller_settings
    else:
        if controller_settings is not None:
            settings = controller_settings if isinstance(controller_settings, EditSettings) else EditSettings.from_dict(controller_settings)
            if settings.mode == "flowedit":
                raise EditError("mode=flowedit edits the image itself, not an inversion: nulltext.editing.flowedit.flowedit(diffusion, latents, ...)")
            if settings.mode == "sdedit":
                return sdedit(diffusion, inversion, target_prompts, settings.strength, guidance_scale=guidance_scale)
        controller = build_controller(settings) if settings is not None else None
    w = inversion.guidance_scale if guidance_scale is None else float(guidance_scale)
    prompts = [inversion.prompts[0], *target_prompts]
    z_T = inversion.z_T.to(diffusion.device)
    conds = prompt_conditions(diffusion, inversion, target_prompts)
    uncond = row_unconds(diffusion, inversion, len(target_prompts), settings.target_uncond if settings is not None else "inversion")
    hooks = method_class(inversion.method).sampling_hooks(diffusion, inversion, rows=len(prompts))
    if controller is None:
        latents = sample_prompts(diffusion, z_T, uncond, conds, w, hooks=hooks)
    else:
        controller.prepare(prompts, context_tokenizer(diffusion.pipe, prompts), diffusion.schedule.num_steps, tuple(z_T.shape[-2:]))
        with attention_control(diffusion.unet, controller):
            latents = sample_prompts(diffusion, z_T, uncond, conds, w, controller, hooks=hooks)
        main = ControllerGroup(controller).find(AttentionEdit)
        if main is not None:
            main.warn_if_no_self_map_was_replaced()
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
