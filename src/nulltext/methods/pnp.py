"""Tuning-free corrections of the sampler on the DDIM pivot: direct inversion and proximal guidance.

Both invert with DDIM at w = 1 and change guided DDIM sampling through
:class:`~nulltext.diffusion.SamplingHooks`, so reconstruction and Prompt-to-Prompt editing share
one implementation: the hooks run inside ``Diffusion.sample`` and ``editing.edit.sample_prompts``,
after the DDIM step and before the local blend.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.diffusion import Diffusion, SamplingHooks, guide
from nulltext.methods.base import Inversion, InversionMethod, Monitor
from nulltext.methods.baselines import NegativePromptInversion
from nulltext.validation import SettingError, check_choice, check_float, check_int


class OffsetHooks(SamplingHooks):
    """Adds the stored offset of step i to every source row after the DDIM step; refuses other scales.

    With ``pivot`` ([B, S+1, C, h, w], index 0 = z*_0) it computes the offsets as it goes: offset i
    is set to what puts the source row on the pivot before it is added, so a sampling run with it
    is the offsets' computation in the sampler's own arithmetic.
    """

    def __init__(self, offsets: Tensor, rows: int, guidance_scale: float, pivot: Tensor | None = None):
        super().__init__(rows)
        self.offsets, self.guidance_scale, self.pivot = offsets, guidance_scale, pivot

    def guide(self, i: int, out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
        if guidance_scale != self.guidance_scale:
            raise SettingError(
                f"direct_inversion's offsets were computed at w={self.guidance_scale:g}; sample or edit at that scale, not w={guidance_scale:g}"
            )
        return guide(out_uncond, out_cond, guidance_scale)

    def after_step(self, i: int, z: Tensor) -> Tensor:
        rows = self.groups(z)
        if self.pivot is not None:
            self.offsets[:, i] = self.pivot[:, -2 - i] - rows[:, 0]
        source = rows[:, :1] + self.offsets[:, i : i + 1].to(z)
        return torch.cat([source, rows[:, 1:]], dim=1).flatten(0, 1)


class DirectInversion(InversionMethod):
    """PnP Inversion / Direct Inversion (Ju, Zeng, Bian, Liu, Xu, ICLR 2024, Algorithm 1; METHODS.md section 2).

    DDIM inversion at w = 1 with the caption gives the pivot z*_0..z*_T. For each sampling step i
    (t = T ... 1) the offset that puts the guided step back on the pivot,

        o_t = z*_{t-k} - Phi_{t->t-k}(z_t, eps_w(z_t, t; C, psi(""))),   z_{t-k} = Phi_{t->t-k}(...) + o_t,

    is computed from the state z_t the sampler will hold (z_T = z*_T, then the previous step plus
    its offset: the official closed loop), and stored (the artifact's ``extras["source_offsets"]``,
    [S, C, h, w] per image). Sampling and Prompt-to-Prompt editing add o_t to the source row after
    each DDIM step, before the local blend; target rows are untouched. A reconstruction from the
    same batch replays the offsets' arithmetic and retraces the pivot to float rounding (the VAE
    bound). The offsets depend on w: reconstruction and edits at another scale are refused (so
    ``extra_guidance_scales`` must stay empty).

    Not done: the paper's ablations (offset scale, offsets every k steps, offsets on the target row).

    Args:
        inversion_guidance_scale: w of the pivot's DDIM inversion (1, the official code; its
            ablation uses CFG with psi("") at 0 ... 7.5).
    """

    name = "direct_inversion"
    families = ("sd", "sdxl")

    def __init__(self, inversion_guidance_scale: float = 1.0, extra_guidance_scales: Sequence[float] = ()):
        if tuple(extra_guidance_scales):
            raise SettingError("direct_inversion's offsets hold for one guidance scale only: leave extra_guidance_scales empty")
        super().__init__(())
        self.inversion_guidance_scale = check_float("inversion_guidance_scale", inversion_guidance_scale, 0.0)

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond, null = diffusion.encode_prompts(prompts)
        pivot = diffusion.ddim_inversion(z0, cond, null, self.inversion_guidance_scale)
        # Closed loop, as the official offset_calculate (cure-lab/PnPInversion@07f97f4
        # models/p2p/inversion.py ~389, `latent_cur = latents_prev_rec + loss`): each offset is taken
        # at the state the sampler will hold (the previous guided step plus its offset), not at the
        # pivot. Computing them inside the sampler itself replays its arithmetic exactly, so a
        # reconstruction lands on the pivot to rounding; offsets taken at the pivot (open loop) let
        # the rounding of each `step + offset` grow through the guided steps. z_T is contiguous as
        # an artifact reloads it: the UNet's rounding depends on the memory layout of its input.
        z_T = pivot[:, -1].contiguous()
        offsets = torch.zeros(pivot[:, 1:].shape, dtype=pivot.dtype, device=pivot.device)
        w = diffusion.guidance_scale
        hooks = OffsetHooks(offsets, 1, w, pivot=pivot)
        diffusion.sample(z_T, null.unsqueeze(1), cond.unsqueeze(1), w, hooks=hooks)
        return Inversion(
            z_T=z_T,
            uncond=null.unsqueeze(1),
            cond=cond.unsqueeze(1),
            prompts=prompts,
            guidance_scale=w,
            iterations=[0] * len(prompts),
            pivot=pivot,
            method=self.name,
            extras={"source_offsets": offsets},
        )

    @classmethod
    def sampling_hooks(cls, diffusion: Diffusion, inversion: Inversion, rows: int) -> SamplingHooks:
        return OffsetHooks(inversion.extras["source_offsets"], rows, inversion.guidance_scale)


PROXIMAL = ("l0", "l1")


class ProximalHooks(SamplingHooks):
    """ProxEdit's guidance (soft-thresholded CFG direction) and inversion guidance toward the pivot."""

    def __init__(self, settings: dict, pivot: Tensor | None, timesteps: Sequence[int], rows: int):
        super().__init__(rows)
        self.settings, self.pivot, self.timesteps = settings, pivot, timesteps
        self.mask: Tensor | None = None

    def guide(self, i: int, out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
        s = self.settings
        self.mask = None
        if s["proximal"] is None:
            return guide(out_uncond, out_cond, guidance_scale)
        delta = out_cond - out_uncond
        if s["quantile"] > 0:  # one threshold per image, over all its rows (source and targets)
            tau = torch.quantile(self.groups(delta.abs()).flatten(1), s["quantile"], dim=1)
            tau = tau.repeat_interleave(self.rows).view(-1, *[1] * (delta.dim() - 1))
        else:
            tau = torch.full_like(delta[:, :1, :1, :1], -s["quantile"])
        delta = delta - torch.clamp(delta, -tau, tau)  # soft thresholding ("l0" in the official code)
        if s["proximal"] == "l1":
            # Two sequential wheres, as the official ptp_utils.py (phymhan/prompt-to-prompt@9955a1f
            # ~123-124): values in (0, tau) go below zero and come back unchanged, so this is not
            # a symmetric tau * sign(delta).
            delta = torch.where(delta > 0, delta - tau, delta)
            delta = torch.where(delta < 0, delta + tau, delta)
        if self.pivot is not None and self.timesteps[i] < s["recon_t"]:
            radius = s["dilate_mask"]
            self.mask = F.max_pool2d((delta.abs() > tau).to(delta.dtype), 2 * radius + 1, stride=1, padding=radius)
        return out_uncond + guidance_scale * delta

    def after_step(self, i: int, z: Tensor) -> Tensor:
        if self.mask is None:
            return z
        target = self.pivot[:, len(self.timesteps) - 1 - i].to(z)  # z*_{t-k} of the image of each row
        target = target.repeat_interleave(self.rows, dim=0)
        return z - self.settings["recon_lr"] * (z - target) * (1 - self.mask)


class ProximalNegativePromptInversion(NegativePromptInversion):
    """Proximal guidance on negative-prompt inversion (ProxEdit; Han et al., WACV 2024; METHODS.md section 1b).

    Negative-prompt inversion (u = C at every step) sampled with the proximal guidance rule: with
    Delta = eps(z, c) - eps(z, u) over the batch of an image's rows [source, targets] and
    tau = quantile(|Delta|, q) over all of its elements (tau = -q when q < 0),

        Delta' = Delta - clip(Delta, -tau, tau)      ("l0": soft thresholding)
        eps    = eps(z, u) + w Delta'

    ("l1", as the official code, then subtracts tau where Delta' > 0 and adds tau where the result
    is < 0: positive values below tau come back unchanged.) Below timestep ``recon_t``, inversion
    guidance pulls the latents after the step toward the pivot outside the edit mask
    M = dilate(|Delta'| > tau, ``dilate_mask``): z_{t-k} <- z_{t-k} - lambda (z_{t-k} - z*_{t-k}) (1 - M),
    lambda = ``recon_lr``. The source row has Delta = 0, so in an edit it is pinned to the pivot
    over those steps. The artifact stores the pivot (``extras["pivot"]``) when inversion guidance
    is on. Not done: the optional reconstruction guidance on x0_hat.

    Proximal and inversion guidance act in editing only: the reconstruction is plain
    negative-prompt sampling, as the official code reconstructs (``inference_stage=False``).

    Args:
        proximal: ``"l0"``, ``"l1"`` or None (plain CFG: negative-prompt inversion).
        quantile: q (0.7, the README's ProxNPI example; ``run_npi.py`` uses 0.75).
        inversion_guidance: apply inversion guidance (True in the README example).
        recon_lr: lambda (1 in the README example).
        recon_t: inversion guidance below this timestep (400: the last 20 of 50 steps).
        dilate_mask: max-pool radius of the mask dilation (1: 3x3).
    """

    name = "proximal_negative_prompt"
    families = ("sd", "sdxl")

    def __init__(
        self,
        proximal: str | None = "l0",
        quantile: float = 0.7,
        inversion_guidance: bool = True,
        recon_lr: float = 1.0,
        recon_t: int = 400,
        dilate_mask: int = 1,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(extra_guidance_scales)
        self.proximal = check_choice("proximal", proximal, (*PROXIMAL, None))
        self.quantile = check_float("quantile", quantile, None, 1.0)
        self.inversion_guidance = bool(check_choice("inversion_guidance", inversion_guidance, (True, False)))
        self.recon_lr = check_float("recon_lr", recon_lr, 0.0, 1.0)
        self.recon_t = check_int("recon_t", recon_t, 0)
        self.dilate_mask = check_int("dilate_mask", dilate_mask, 0)
        if self.inversion_guidance and self.proximal is None:
            raise SettingError("inversion_guidance needs the edit mask of proximal guidance: set proximal to 'l0' or 'l1'")

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        inversion = super().invert(diffusion, z0, prompts, seeds, monitor)
        inversion.method = self.name
        inversion.settings = {k: getattr(self, k) for k in ("proximal", "quantile", "inversion_guidance", "recon_lr", "recon_t", "dilate_mask")}
        if self.inversion_guidance:
            inversion.extras = {"pivot": inversion.pivot}
        return inversion

    @classmethod
    def sampling_hooks(cls, diffusion: Diffusion, inversion: Inversion, rows: int) -> SamplingHooks:
        pivot = inversion.extras["pivot"] if inversion.settings["inversion_guidance"] else None
        return ProximalHooks(inversion.settings, pivot, diffusion.timesteps, rows)

    @classmethod
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        # The official reconstruction samples with inference_stage=False: plain CFG with u = C
        # (phymhan/prompt-to-prompt@9955a1f negative_prompt_inversion.py ~602-603). Thresholding one
        # row would threshold |eps(z, C) - eps(z, C)|, i.e. rounding noise.
        return diffusion.sample(inversion.z_T, inversion.uncond, inversion.cond, guidance_scale)

