"""Per-step pivotal optimisation: null-text inversion (Algorithm 1) and its pivot/caption/variable variants."""

from __future__ import annotations

import random
from typing import Literal, Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.errors import CaptionError
from nulltext.methods.base import Inversion, InversionMethod, Monitor, gaussian_like


class NullTextInversion(InversionMethod):
    """Null-text inversion, per step (Mokady et al. 2023, Algorithm 1; ALGORITHM.md section 4).

    For each DDIM step i (t = T ... 1), starting from z_bar = z*_T and null_0 = psi(""):
    a fresh Adam on null_i (warm-started from null_{i-1}) with lr = lr0 (1 - i * lr_decay) takes up
    to ``num_inner_steps`` steps on || z_{t-1}(z_bar, null_i, C) - z*_{t-1} ||^2 (eq. 3), the
    guided DDIM step at w; after a step, stop early if the pre-step loss < epsilon + slope * i.
    Then z_bar advances with the stored null_i, never reset to the pivot.

    Batched: every image has its own embedding, its own Adam state (one parameter group each) and
    its own early stop; a stopped image takes no further steps (its gradient is None, which Adam
    skips) and leaves the UNet batch.

    Args:
        num_inner_steps: N, the most Adam steps per timestep (10 in the paper).
        learning_rate: lr0 (0.01).
        lr_decay: lr at step i is lr0 * (1 - i * lr_decay) (1/100 in the official code).
        early_stop_epsilon, early_stop_slope: the early-stop threshold epsilon + slope * i.
        pivot_guidance_scale: guidance of the DDIM inversion that makes the pivot (1 in the
            paper; its Fig. 9 sweeps 1 to 8).
    """

    name = "null_text"
    # Which embedding is optimised per step: the null text ("uncond") or the caption ("cond").
    variable: Literal["uncond", "cond"] = "uncond"

    def __init__(
        self,
        num_inner_steps: int = 10,
        learning_rate: float = 1e-2,
        lr_decay: float = 1e-2,
        early_stop_epsilon: float = 1e-5,
        early_stop_slope: float = 2e-5,
        pivot_guidance_scale: float = 1.0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(extra_guidance_scales)
        self.pivot_guidance_scale = float(pivot_guidance_scale)
        self.num_inner_steps = int(num_inner_steps)
        self.learning_rate = float(learning_rate)
        self.lr_decay = float(lr_decay)
        self.early_stop_epsilon = float(early_stop_epsilon)
        self.early_stop_slope = float(early_stop_slope)

    def pivot(self, diffusion: Diffusion, z0: Tensor, cond: Tensor, null: Tensor, seeds: list[int]) -> Tensor:
        """The trajectory to retrace: DDIM inversion, at w = 1 by default (ALGORITHM.md section 3)."""
        return diffusion.ddim_inversion(z0, cond, null, self.pivot_guidance_scale)

    def inversion_prompts(self, prompts: list[str], seeds: list[int]) -> list[str]:
        return prompts

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        prompts = self.inversion_prompts(prompts, seeds)
        cond = diffusion.encode_text(prompts)
        null = diffusion.encode_text([""]).expand_as(cond)
        pivot = self.pivot(diffusion, z0, cond, null, seeds)
        uncond, cond_steps, iterations = self.optimise(diffusion, pivot, null, cond)
        return Inversion(
            z_T=pivot[:, -1],
            uncond=uncond,
            cond=cond_steps,
            prompts=prompts,
            guidance_scale=diffusion.guidance_scale,
            iterations=iterations,
            pivot=pivot,
            extra_guidance_scales=self.extra_guidance_scales,
        )

    def optimise(self, diffusion: Diffusion, pivot: Tensor, null: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Run the per-step loop; returns (uncond, cond) as [B,S,L,D] or [B,1,L,D] and iterations per image."""
        schedule, w = diffusion.schedule, diffusion.guidance_scale
        batch, num_steps = pivot.shape[0], schedule.num_steps
        optimise_uncond = self.variable == "uncond"
        current, fixed = (null, cond) if optimise_uncond else (cond, null)
        current = current.detach().clone()
        z_bar = pivot[:, -1].clone()
        stored, iterations = [], [0] * batch
        for i, t in enumerate(schedule.timesteps):
            target = pivot[:, num_steps - 1 - i]
            params = [current[b].clone().requires_grad_(True) for b in range(batch)]
            lr = self.learning_rate * (1.0 - i * self.lr_decay)
            optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p in params])
            with torch.no_grad():
                out_fixed = diffusion.model_output(z_bar, t, fixed)
            threshold = self.early_stop_epsilon + self.early_stop_slope * i
            active = list(range(batch))
            for _ in range(self.num_inner_steps):
                idx = torch.tensor(active, device=z_bar.device)
                z_in = z_bar[idx]
                with torch.enable_grad():
                    out_var = diffusion.model_output(z_in, t, torch.stack([params[b] for b in active]))
                    out_u, out_c = (out_var, out_fixed[idx]) if optimise_uncond else (out_fixed[idx], out_var)
                    z_prev = schedule.denoise_step(out_u + w * (out_c - out_u), t, z_in)
                    losses = (z_prev - target[idx]).pow(2).flatten(1).mean(1)
                    optimizer.zero_grad(set_to_none=True)
                    losses.sum().backward()
                optimizer.step()
                for b in active:
                    iterations[b] += 1
                active = [b for b, loss in zip(active, losses.tolist()) if not loss < threshold]
                if not active:
                    break
            current = torch.stack([p.detach() for p in params])
            stored.append(current)
            with torch.no_grad():
                uncond_i, cond_i = (current, fixed) if optimise_uncond else (fixed, current)
                z_bar = schedule.denoise_step(diffusion.guided_output(z_bar, t, uncond_i, cond_i, w), t, z_bar)
        per_step = torch.stack(stored, dim=1)
        shared = fixed.unsqueeze(1)
        return (per_step, shared, iterations) if optimise_uncond else (shared, per_step, iterations)


class RandomPivotNullText(NullTextInversion):
    """Ablation: the pivot is forward noising q(z_t | z_0) with ONE fixed noise draw per image."""

    name = "random_pivot"

    def pivot(self, diffusion: Diffusion, z0: Tensor, cond: Tensor, null: Tensor, seeds: list[int]) -> Tensor:
        noise = gaussian_like(z0, seeds)
        noised = [diffusion.schedule.add_noise(z0, noise, t) for t in reversed(diffusion.timesteps)]
        return torch.stack([z0, *noised], dim=1)


class RandomCaptionNullText(NullTextInversion):
    """Ablation: null-text inversion with the caption of another image of the dataset (seeded)."""

    name = "random_caption"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pool: list[str] = []

    def prepare(self, captions: Sequence[str]) -> None:
        self._pool = sorted({c for c in captions if c.strip()})

    def inversion_prompts(self, prompts: list[str], seeds: list[int]) -> list[str]:
        chosen = []
        for prompt, seed in zip(prompts, seeds):
            others = [c for c in self._pool if c != prompt]
            if not others:
                raise CaptionError(
                    "random_caption needs the captions of other images: run it on a dataset with at least "
                    "two different captions (or pass caption_pool= to the API)"
                )
            chosen.append(random.Random(seed).choice(others))
        return chosen


class TextualInversionPivot(NullTextInversion):
    """Ablation: the per-step loop of Algorithm 1 optimising the caption embedding C_t instead of null_t."""

    name = "textual_inversion_pivot"
    variable = "cond"
