"""Algebraically exact inversions: EDICT's coupled sequences and BDIA's bi-directional integration.

Both replace the DDIM sampler by an invertible one, so inversion followed by their own sampler
returns the starting latents up to floating-point error -- provided both directions use the same
guidance and embeddings (enforced: one ``guidance_scale`` serves both ways, and reconstruction at
another scale is refused). Their inverse amplifies rounding (EDICT by 1/p^2, BDIA by 1/gamma per
step; METHODS.md sections 3-4), hence ``dtype: float64`` (the official setting), which runs the
UNet in float64 for the duration of the call.

Editing: the official code edits by regenerating with the edit prompt, or with its own attention
swap; Prompt-to-Prompt's controllers on the coupled (EDICT) or two-state (BDIA) sampler are not
in either official code (METHODS.md: unconfirmed), so ``nulltext edit`` refuses these inversions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from nulltext.ddim import ddim_map
from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor
from nulltext.validation import SettingError, check_choice, check_float

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _ExactInversion(InversionMethod):
    """Shared settings: one guidance scale both ways, the arithmetic, no extra scales."""

    editable = False
    edit_instead = "its exact sampler has no Prompt-to-Prompt controller; edit a direct_inversion, negative_prompt or null_text inversion"

    def __init__(self, guidance_scale: float, dtype: str, extra_guidance_scales: Sequence[float]):
        if tuple(extra_guidance_scales):
            raise SettingError(f"{self.name} is exact only at the guidance it inverted with: leave extra_guidance_scales empty")
        super().__init__(())
        self.guidance_scale = check_float("guidance_scale", guidance_scale, 0.0)
        self.dtype = check_choice("dtype", dtype, DTYPES)

    def record(self, z_T: Tensor, extras: dict, prompts: list[str], cond: Tensor, null: Tensor) -> Inversion:
        return Inversion(
            z_T=z_T,
            uncond=null.unsqueeze(1),
            cond=cond.unsqueeze(1),
            prompts=prompts,
            guidance_scale=self.guidance_scale,
            iterations=[0] * len(prompts),
            method=self.name,
            settings=self.sampler_settings(),
            extras=extras,
        )

    def sampler_settings(self) -> dict:
        return {"dtype": self.dtype}

    @classmethod
    def check_guidance(cls, inversion: Inversion, guidance_scale: float) -> None:
        if guidance_scale != inversion.guidance_scale:
            raise SettingError(
                f"{cls.name} is exact only at the guidance it inverted with (w={inversion.guidance_scale:g}), not w={guidance_scale:g}"
            )


class EDICTInversion(_ExactInversion):
    """EDICT (Wallace, Gokul, Naik, "Exact Diffusion Inversion via Coupled Transformations", CVPR 2023).

    Two coupled sequences x, y, each DDIM step a z + b eps written with the other one's noise
    (the paper's coupled DDIM steps and mixing layer; METHODS.md section 3), a = sqrt(abar_{t-k} / abar_t),
    b = sqrt(1 - abar_{t-k}) - a sqrt(1 - abar_t), the UNet at the upper timestep t both ways:

        x' = a x + b eps(y, t);   y' = a y + b eps(x', t)
        x'' = p x' + (1 - p) y';  y'' = p y' + (1 - p) x''          (mixing)

    With ``leapfrog`` the order alternates (y first at odd generation steps), as the official code
    does. Inversion undoes the mixing, then the two sub-steps in reverse order (the paper's inverse steps),
    starting from x = y = z_0. The order is keyed to the generation step index, so every number
    of steps is exact (the diffusers port's ascending parity is not). The artifact keeps x_T as
    ``z_T`` and y_T in ``extras``. Reconstruction returns the x sequence. The VAE latent is the
    posterior mean here (the official code samples it with seed 1): every method sees the same z_0.

    Args:
        mixing: p (0.93; p = 1 gives two uncoupled DDIM chains, which do not invert).
        leapfrog: alternate which sequence moves first (True).
        guidance_scale: w both ways (7, the official reconstruction's ``coupled_stablediffusion``).
        dtype: ``float64`` (official: UNet, text model and latents upcast) or ``float32``.
    """

    name = "edict"
    families = ("sd", "sdxl")

    def __init__(
        self,
        mixing: float = 0.93,
        leapfrog: bool = True,
        guidance_scale: float = 7.0,
        dtype: str = "float64",
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(guidance_scale, dtype, extra_guidance_scales)
        self.mixing = check_float("mixing", mixing, 0.0, 1.0, strict_minimum=True)
        self.leapfrog = bool(check_choice("leapfrog", leapfrog, (True, False)))

    def sampler_settings(self) -> dict:
        return {"dtype": self.dtype, "mixing": self.mixing, "leapfrog": self.leapfrog}

    @staticmethod
    def coefficients(diffusion: Diffusion, i: int) -> tuple[int, float, float]:
        """(t, a, b) of generation step ``i``: z_{t-k} = a z_t + b eps."""
        schedule = diffusion.schedule
        t = diffusion.timesteps[i]
        alpha_t, alpha_prev = schedule.alpha(t), schedule.alpha(t - schedule.step_ratio)
        a = math.sqrt(alpha_prev / alpha_t)
        return t, a, math.sqrt(1 - alpha_prev) - a * math.sqrt(1 - alpha_t)

    @classmethod
    def denoise_step(
        cls, diffusion: Diffusion, i: int, x: Tensor, y: Tensor, uncond: Tensor, cond: Tensor, w: float, mixing: float, leapfrog: bool
    ) -> tuple[Tensor, Tensor]:
        """Generation step ``i`` (t = timesteps[i] -> t - k) of the pair (x, y)."""
        t, a, b = cls.coefficients(diffusion, i)
        eps = lambda z: diffusion.noise_estimate(z, t, uncond, cond, w)  # noqa: E731
        if leapfrog and i % 2:
            y = a * y + b * eps(x)
            x = a * x + b * eps(y)
        else:
            x = a * x + b * eps(y)
            y = a * y + b * eps(x)
        x = mixing * x + (1 - mixing) * y
        y = mixing * y + (1 - mixing) * x
        return x, y

    @classmethod
    def invert_step(
        cls, diffusion: Diffusion, i: int, x: Tensor, y: Tensor, uncond: Tensor, cond: Tensor, w: float, mixing: float, leapfrog: bool
    ) -> tuple[Tensor, Tensor]:
        """The exact inverse of :meth:`denoise_step` ``i`` (t - k -> t)."""
        t, a, b = cls.coefficients(diffusion, i)
        eps = lambda z: diffusion.noise_estimate(z, t, uncond, cond, w)  # noqa: E731
        y = (y - (1 - mixing) * x) / mixing
        x = (x - (1 - mixing) * y) / mixing
        if leapfrog and i % 2:
            x = (x - b * eps(y)) / a
            y = (y - b * eps(x)) / a
        else:
            y = (y - b * eps(x)) / a
            x = (x - b * eps(y)) / a
        return x, y

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond, null = diffusion.encode_prompts(prompts)
        dtype = DTYPES[self.dtype]
        u, c = null.to(dtype), cond.to(dtype)
        x = y = z0.to(dtype)
        with diffusion.unet_dtype(dtype):
            for i in reversed(range(diffusion.schedule.num_steps)):
                x, y = self.invert_step(diffusion, i, x, y, u, c, self.guidance_scale, self.mixing, self.leapfrog)
        return self.record(x, {"y_T": y}, prompts, cond, null)

    @classmethod
    @torch.no_grad()
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        cls.check_guidance(inversion, guidance_scale)
        settings = inversion.settings
        dtype = DTYPES[settings["dtype"]]
        u, c = inversion.uncond[:, 0].to(dtype), inversion.cond[:, 0].to(dtype)
        x, y = inversion.z_T.to(dtype), inversion.extras["y_T"].to(dtype)
        trajectory = [x]
        with diffusion.unet_dtype(dtype):
            for i in range(diffusion.schedule.num_steps):
                x, y = cls.denoise_step(diffusion, i, x, y, u, c, guidance_scale, settings["mixing"], settings["leapfrog"])
                trajectory.append(x)
        return torch.stack(trajectory, dim=1)


class BDIAInversion(_ExactInversion):
    """BDIA (Zhang, Lewis, Kleijn, "Exact Diffusion Inversion via Bi-directional Integration Approximation", ECCV 2024).

    States z_0 = z_T, z_1, ..., z_S = z_0-latent at the sampler's levels; eps_k = eps_w(z_k, t_k)
    with the UNet at the state's own level; D_{k->j}(z_k) = Phi_{t_k->t_j}(z_k, eps_k). The
    sampling step (the paper's BDIA-DDIM update; METHODS.md section 4) and its exact inverse:

        z_{k+1} = gamma z_{k-1} - gamma D_{k->k-1}(z_k) + D_{k->k+1}(z_k)
        z_{k-1} = (z_{k+1} - D_{k->k+1}(z_k)) / gamma + D_{k->k-1}(z_k)

    Inversion starts from the pair (z_S, z_{S-1}), z_{S-1} one plain DDIM inversion step of the
    VAE latent (the official code's first step is an identity because its last timestep is 0;
    here it is 1), and keeps the top pair (z_T as ``z_T``, z_{T-k} in ``extras``). gamma = 0 is
    DDIM and cannot be inverted; the inverse amplifies an oscillating mode like gamma^-S.

    Args:
        gamma: the mixing weight of the previous state (0.94: the official notebook; the README
            recommends [0.92, 1] for editing; the function default 0.5 needs float64 and few steps).
        guidance_scale: w both ways (3, the official ``BDIA_editing``).
        dtype: ``float64`` (official) or ``float32``.
    """

    name = "bdia"
    families = ("sd", "sdxl")

    def __init__(self, gamma: float = 0.94, guidance_scale: float = 3.0, dtype: str = "float64", extra_guidance_scales: Sequence[float] = ()):
        super().__init__(guidance_scale, dtype, extra_guidance_scales)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0, strict_minimum=True)

    def sampler_settings(self) -> dict:
        return {"dtype": self.dtype, "gamma": self.gamma}

    @staticmethod
    def level(diffusion: Diffusion, k: int) -> float:
        """alpha-bar of state k (k = S: the final level the sampler ends at)."""
        schedule, timesteps = diffusion.schedule, diffusion.timesteps
        return schedule.alpha(timesteps[k] if k < len(timesteps) else timesteps[-1] - schedule.step_ratio)

    @classmethod
    def moves(cls, diffusion: Diffusion, k: int, z: Tensor, uncond: Tensor, cond: Tensor, w: float) -> tuple[Tensor, Tensor]:
        """(D_{k->k-1}(z_k), D_{k->k+1}(z_k)) with one guided UNet evaluation at t_k."""
        eps = diffusion.noise_estimate(z, diffusion.timesteps[k], uncond, cond, w)
        here = cls.level(diffusion, k)
        return ddim_map(z, eps, here, cls.level(diffusion, k - 1)), ddim_map(z, eps, here, cls.level(diffusion, k + 1))

    @classmethod
    def denoise_step(
        cls, diffusion: Diffusion, k: int, z_prev: Tensor, z: Tensor, uncond: Tensor, cond: Tensor, w: float, gamma: float
    ) -> Tensor:
        """z_{k+1} from (z_{k-1}, z_k), 1 <= k < S."""
        back, forward = cls.moves(diffusion, k, z, uncond, cond, w)
        return gamma * z_prev - gamma * back + forward

    @classmethod
    def invert_step(
        cls, diffusion: Diffusion, k: int, z: Tensor, z_next: Tensor, uncond: Tensor, cond: Tensor, w: float, gamma: float
    ) -> Tensor:
        """z_{k-1} from (z_k, z_{k+1}): the exact inverse of :meth:`denoise_step`."""
        back, forward = cls.moves(diffusion, k, z, uncond, cond, w)
        return (z_next - forward) / gamma + back

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond, null = diffusion.encode_prompts(prompts)
        dtype, steps = DTYPES[self.dtype], diffusion.schedule.num_steps
        u, c = null.to(dtype), cond.to(dtype)
        z_next = z0.to(dtype)
        with diffusion.unet_dtype(dtype):
            eps = diffusion.noise_estimate(z_next, diffusion.timesteps[-1], u, c, self.guidance_scale)
            z = ddim_map(z_next, eps, self.level(diffusion, steps), self.level(diffusion, steps - 1))
            for k in range(steps - 1, 0, -1):
                z, z_next = self.invert_step(diffusion, k, z, z_next, u, c, self.guidance_scale, self.gamma), z
        return self.record(z, {"z_next": z_next}, prompts, cond, null)

    @classmethod
    @torch.no_grad()
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        cls.check_guidance(inversion, guidance_scale)
        dtype, gamma = DTYPES[inversion.settings["dtype"]], inversion.settings["gamma"]
        u, c = inversion.uncond[:, 0].to(dtype), inversion.cond[:, 0].to(dtype)
        trajectory = [inversion.z_T.to(dtype), inversion.extras["z_next"].to(dtype)]
        with diffusion.unet_dtype(dtype):
            for k in range(1, diffusion.schedule.num_steps):
                trajectory.append(cls.denoise_step(diffusion, k, trajectory[-2], trajectory[-1], u, c, guidance_scale, gamma))
        return torch.stack(trajectory, dim=1)
