"""Global null-text: one null embedding shared by every timestep (paper Sec. 4 ablation)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion, guide
from nulltext.methods.base import PAPER_ABLATION, Inversion, InversionMethod, Monitor
from nulltext.validation import check_int, check_positive, check_probability


class GlobalNullTextInversion(InversionMethod):
    """One shared null embedding per image, optimised against the w = 1 DDIM pivot.

    Each of ``num_passes`` passes restarts from z_bar = z*_T and sweeps t = T ... 1 with one Adam
    update per step on eq. (3), advancing z_bar with the updated embedding. One Adam state per
    image lives across all passes; the learning rate follows the per-step schedule of Algorithm 1
    within each pass. Total iterations = num_passes * S. The per-image mean loss of every pass is
    recorded as a curve, and the monitor sees the inversion after every pass.

    Settings: ``num_passes`` >= 1, ``learning_rate`` > 0, ``lr_decay`` in [0, 1].
    """

    name = "null_text_global"
    not_applicable = {"sdxl": PAPER_ABLATION}

    def __init__(
        self,
        num_passes: int = 10,
        learning_rate: float = 1e-2,
        lr_decay: float = 1e-2,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(extra_guidance_scales)
        self.num_passes = check_int("inversion.num_passes", num_passes, 1)
        self.learning_rate = check_positive("inversion.learning_rate", learning_rate)
        self.lr_decay = check_probability("inversion.lr_decay", lr_decay)

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        schedule, w = diffusion.schedule, diffusion.guidance_scale
        cond, null = diffusion.encode_prompts(prompts)
        null = null.clone().requires_grad_(True)
        pivot = diffusion.ddim_inversion(z0, cond)
        num_steps = schedule.num_steps
        # Adam is elementwise, so one optimizer over the [B, L, D] tensor is B independent ones.
        optimizer = torch.optim.Adam([null], lr=self.learning_rate)
        curve: list[list[float]] = [[] for _ in prompts]
        for done in range(1, self.num_passes + 1):
            z_bar = pivot[:, -1]
            pass_loss = torch.zeros(len(prompts))
            for i, t in enumerate(schedule.timesteps):
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate * (1.0 - i * self.lr_decay)
                with torch.no_grad():
                    out_c = diffusion.model_output(z_bar, t, cond)
                with torch.enable_grad():
                    out_u = diffusion.model_output(z_bar, t, null)
                    z_prev = schedule.denoise_step(guide(out_u, out_c, w), t, z_bar)
                    losses = (z_prev - pivot[:, num_steps - 1 - i]).pow(2).flatten(1).mean(1)
                    optimizer.zero_grad(set_to_none=True)
                    losses.sum().backward()
                optimizer.step()
                pass_loss += losses.detach().cpu()
                with torch.no_grad():
                    z_bar = schedule.denoise_step(diffusion.guided_output(z_bar, t, null, cond, w), t, z_bar)
            for b, value in enumerate((pass_loss / num_steps).tolist()):
                curve[b].append(value)
            snapshot = Inversion(
                z_T=pivot[:, -1],
                uncond=null.detach().clone().unsqueeze(1),
                cond=cond.unsqueeze(1),
                prompts=prompts,
                guidance_scale=w,
                iterations=[done * num_steps] * len(prompts),
                pivot=pivot,
                extra_guidance_scales=self.extra_guidance_scales,
                curves={"pass_loss": [c[:] for c in curve]},
            )
            if monitor is not None and done < self.num_passes:
                monitor(snapshot)
        return snapshot
