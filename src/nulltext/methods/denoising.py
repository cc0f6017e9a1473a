"""Baselines optimised with the diffusion training loss instead of a pivot (paper Sec. 4 ablation)."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion, guide
from nulltext.methods.base import PAPER_ABLATION, Inversion, InversionMethod, Monitor
from nulltext.validation import check_int, check_positive


class TextualInversion(InversionMethod):
    """Textual inversion (Gal et al. 2022) of the caption embedding C, no pivot.

    Minimises E_{t, eps} || target(z_0, eps, t) - out(z_t, t) ||^2 (the training loss; the target
    is eps, or v for v-prediction models) at uniformly random training timesteps t and fresh noise,
    each image with its own seeded draws. After optimisation, z_T is the w = 1 DDIM inversion with
    the optimised C and the reconstruction samples at w = 7.5 with psi("") (the paper does not say
    how its baseline is sampled; this is the standard editing setup).

    Args:
        num_iterations: Adam steps (one random t and noise per image each; >= 1).
        learning_rate: Adam learning rate on the 77 x D embedding (finite, > 0).
        report_every: hand the current inversion to the monitor every this many iterations (>= 0; 0: never),
            so that one long run gives the whole convergence curve.
    """

    name = "textual_inversion"
    not_applicable = {"sdxl": PAPER_ABLATION}
    variable: Literal["uncond", "cond"] = "cond"

    def __init__(
        self,
        num_iterations: int = 500,
        learning_rate: float = 5e-3,
        report_every: int = 0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(extra_guidance_scales)
        self.num_iterations = check_int("inversion.num_iterations", num_iterations, 1)
        self.learning_rate = check_positive("inversion.learning_rate", learning_rate)
        self.report_every = check_int("inversion.report_every", report_every, 0)

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        schedule, w = diffusion.schedule, diffusion.guidance_scale
        cond, null = diffusion.encode_prompts(prompts)
        optimise_uncond = self.variable == "uncond"
        variable = (null if optimise_uncond else cond).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([variable], lr=self.learning_rate)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        num_train = len(schedule.alphas_cumprod)
        curve: list[list[float]] = [[] for _ in prompts]
        for iteration in range(1, self.num_iterations + 1):
            t = torch.stack([torch.randint(num_train, (1,), generator=g) for g in generators]).flatten()
            noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators]).to(z0)
            alpha = schedule.alphas_cumprod[t].to(z0).view(-1, 1, 1, 1)
            z_t = alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise
            if schedule.prediction_type == "v_prediction":
                target = alpha.sqrt() * noise - (1 - alpha).sqrt() * z0
            else:
                target = noise
            t_unet = t.to(z0.device)
            with torch.enable_grad():
                if optimise_uncond:
                    # The null embedding acts only through guidance, so the guided output is trained.
                    with torch.no_grad():
                        out_c = diffusion.unet(z_t, t_unet, encoder_hidden_states=cond).sample
                    out_u = diffusion.unet(z_t, t_unet, encoder_hidden_states=variable).sample
                    prediction = guide(out_u, out_c, w)
                else:
                    prediction = diffusion.unet(z_t, t_unet, encoder_hidden_states=variable).sample
                losses = (prediction - target).pow(2).flatten(1).mean(1)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
            optimizer.step()
            for b, value in enumerate(losses.tolist()):
                curve[b].append(value)
            if monitor is not None and self.report_every and iteration % self.report_every == 0 and iteration < self.num_iterations:
                monitor(self.result(diffusion, z0, prompts, variable.detach().clone(), null, cond, iteration, curve))
        return self.result(diffusion, z0, prompts, variable.detach(), null, cond, self.num_iterations, curve)

    def result(self, diffusion, z0, prompts, optimised, null, cond, iterations, curve) -> Inversion:
        """The inversion with the embedding as optimised so far: z_T by w = 1 DDIM inversion with it."""
        uncond, cond_final = (optimised, cond) if self.variable == "uncond" else (null, optimised)
        pivot = diffusion.ddim_inversion(z0, cond_final)
        return self.pivot_record(
            pivot, uncond, cond_final, prompts, diffusion.guidance_scale, iterations,
            curves={"denoising_loss": [c[:] for c in curve]},
        )


class NullTextNoPivot(TextualInversion):
    """Ablation: optimise one null embedding with the denoising loss (guided output), no pivot.

    z_T is the usual w = 1 DDIM inversion with the caption; sampling uses the optimised null text.
    """

    name = "null_text_no_pivot"
    variable = "uncond"

    def __init__(
        self,
        num_iterations: int = 500,
        learning_rate: float = 1e-2,
        report_every: int = 0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(num_iterations, learning_rate, report_every, extra_guidance_scales)
