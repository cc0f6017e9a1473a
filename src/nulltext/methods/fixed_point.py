"""The implicit DDIM inversion step solved by fixed-point iteration: plain (FPI) and with averaging (ReNoise).

DDIM sampling maps z_t to z_{t-k} = Phi_{t->t-k}(z_t, eps(z_t, t)); its exact inverse is the z_t
that solves the implicit equation (METHODS.md section 5)

    z_t = Phi_{t-k->t}(z_{t-k}, eps_w(z_t, t)).

Both methods iterate z^(0) = z_{t-k}, z^(j+1) = Phi_{t-k->t}(z_{t-k}, eps_w(z^(j), t)); one iteration
is plain DDIM inversion (the UNet at the target timestep on the source latent). Neither is
machine-exact: quality depends on convergence. Both keep only z_T and sample with ordinary guided
DDIM, so Prompt-to-Prompt edits them unchanged.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nulltext.ddim import ddim_map
from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor, gaussian_like
from nulltext.validation import SettingError, check_choice, check_float, check_int


def implicit_step(diffusion: Diffusion, z_source: Tensor, eps: Tensor, t: int) -> Tensor:
    """Phi_{t-k->t}(z_{t-k}, eps): the inversion step from the source latent along ``eps``."""
    schedule = diffusion.schedule
    return ddim_map(z_source, eps, schedule.alpha(t - schedule.step_ratio), schedule.alpha(t))


class _ImplicitInversion(InversionMethod):
    """Shared loop: embeddings, the trajectory of solved steps, an ordinary guided-DDIM record."""

    def __init__(self, inversion_guidance_scale: float, guidance_scale: float, extra_guidance_scales: Sequence[float]):
        super().__init__(extra_guidance_scales)
        self.inversion_guidance_scale = check_float("inversion_guidance_scale", inversion_guidance_scale, 0.0)
        self.guidance_scale = check_float("guidance_scale", guidance_scale, 0.0)

    def solve(self, diffusion: Diffusion, z_source: Tensor, t: int, uncond: Tensor, cond: Tensor, state: dict) -> Tensor:
        """z_t from z_{t-k}: the method's solution of the implicit step."""
        raise NotImplementedError

    def unet_calls(self, t: int) -> int:
        """UNet calls of the step to timestep ``t``."""
        raise NotImplementedError

    def start(self, diffusion: Diffusion, z0: Tensor, seeds: list[int]) -> dict:
        """Per-batch state the solver needs (ReNoise's reference noise)."""
        return {"z0": z0}

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        cond, null = diffusion.encode_prompts(prompts)
        state = self.start(diffusion, z0, seeds)
        latents = [z0]
        for t in reversed(diffusion.timesteps):
            latents.append(self.solve(diffusion, latents[-1], t, null, cond, state))
        unet_calls = sum(self.unet_calls(t) for t in diffusion.timesteps)
        return self.pivot_record(torch.stack(latents, dim=1), null, cond, prompts, self.guidance_scale, unet_calls)


class FixedPointInversion(_ImplicitInversion):
    """Fixed-point inversion (Meiri, Samuel, Darshan, Chechik, Avidan, Ben-Ari, arXiv 2312.12540 v1).

    Plain iteration of the implicit step, with no averaging and no early stop (the official
    ``dvirsamuel/FPI`` code): z^(j+1) = Phi_{t-k->t}(z_{t-k}, eps_w(z^(j), t)), j < ``num_iterations``.
    ``num_iterations = 1`` is DDIM inversion at ``inversion_guidance_scale``. The official code
    inverts and samples with the same w = 2, which the exact inverse of the sampler needs (it then
    solves the sampler's own step); a different sampling scale is allowed, as an ablation.
    ``iterations`` counts UNet evaluations (``num_iterations`` per step).

    Not done: the paper's "prompt-aware adjustment" (an img2img pass at strength 0.05 before
    inverting).

    Args:
        num_iterations: fixed-point iterations per step (20 in the official ``main.py``).
        inversion_guidance_scale: w of eps_w inside the iteration (2).
        guidance_scale: w of the reconstruction and edit sampler (2).
    """

    name = "fixed_point"
    families = ("sd", "sdxl")

    def __init__(
        self,
        num_iterations: int = 20,
        inversion_guidance_scale: float = 2.0,
        guidance_scale: float = 2.0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(inversion_guidance_scale, guidance_scale, extra_guidance_scales)
        self.num_iterations = check_int("num_iterations", num_iterations, 1)

    def unet_calls(self, t: int) -> int:
        return self.num_iterations

    def solve(self, diffusion: Diffusion, z_source: Tensor, t: int, uncond: Tensor, cond: Tensor, state: dict) -> Tensor:
        z = z_source
        for _ in range(self.num_iterations):
            z = implicit_step(diffusion, z_source, diffusion.noise_estimate(z, t, uncond, cond, self.inversion_guidance_scale), t)
        return z


class ReNoiseInversion(_ImplicitInversion):
    """ReNoise (Garibi, Patashnik, Voynov, Averbuch-Elor, Cohen-Or, ECCV 2024; METHODS.md section 5).

    Renoising iterations of the implicit step, then one step along the average of some of the noise
    estimates (paper Algorithm 1; averaging the estimates equals averaging the iterates, as Phi is
    affine in eps), in the official order of operations (garibida/ReNoise-Inversion@fa83238
    ``src/renoise_inversion.py``, ``inversion_step``). Estimate 0 is eps_w(z_{t-k}, t) (DDIM
    inversion's), estimate j >= 1 is eps_w(z^(j), t) with z^(j) = Phi_{t-k->t}(z_{t-k}, estimate j-1,
    regularised if j-1 >= first); there are n + 1, n = ``num_renoise_steps`` (at most
    ``max_renoise_steps_low`` below ``average_below_t``). The RAW estimates with index in the window
    [first, stop) -- ``average_low`` below timestep ``average_below_t``, ``average_high`` above --
    are averaged, and the step is taken along the average, regularised once. A window holding no
    estimate (as the official [8, 10) with one renoising iteration) takes the last iterate
    z^(n+1), with no regularisation at all.

    ``noise_regularization`` (from pix2pix-zero, as the official code): an estimate or average is
    pushed ``num_reg_steps`` times toward the statistics of a reference estimate -- eps_w at z_0
    noised to level t with one fixed draw per image -- by
    eps -= lambda_kl clip(grad patch_kl(eps, eps_ref), +-100), then ``num_ac_rolls`` times
    eps -= lambda_ac grad L_pair / num_ac_rolls (squared autocorrelation at random rolls, pooled
    down to 8x8). Every random draw is per image (the official code draws the rolls from one torch
    generator for the whole run). Not done: the noise correction for stochastic samplers (DDIM is
    deterministic; the SD example turns it off).

    The defaults are the official SD example (``examples/inversion_example_sd.py`` with its
    ``RunConfig``, ``src/config.py``): one renoising iteration, windows [0, 5) and [8, 10) (estimates
    0 and 1 averaged below t = 250, the last iterate above), regularisation on with lambda_ac = 20,
    lambda_kl = 0.065, 4 regularisation steps and 5 rolls, inverting and sampling without CFG
    (w = 1). The paper's Table 3 gives lambda_pair = 10 and lambda_patch-KL = 0.05 instead.

    On SDXL the same defaults are its official SDXL settings: ``examples/inversion_example_sdxl.py``
    (garibida/ReNoise-Inversion@fa83238) sets the same ``RunConfig`` as the SD example -- DDIM,
    50 inversion and 50 sampling steps (lines 22-23), 1 renoising iteration (24), no noise
    correction (26), every other setting the ``src/config.py`` default (averaging windows (0, 5) and
    (8, 10), lines 29-31; lambda_ac 20, lambda_kl 0.065, 4 steps, 5 rolls, lines 35-41; inversion
    guidance 0, i.e. the conditional prediction alone, line 17) -- and samples with guidance 1.0
    (line 40). What differs is outside the method: 1024 px images (line 18; ``model=sdxl``'s
    resolution) and float16 weights (``src/utils/enums_utils.py``, ``is_float16``; here
    ``model.dtype``). So ``inversion=renoise`` selects them on an SDXL model with no SDXL config of
    its own, and ``diffusion=ddim50`` (the default sampler config) the step count.

    Args:
        num_renoise_steps: renoising iterations per step (1 in the SD example and the paper).
        max_renoise_steps_low: at most this many below ``average_below_t`` (5, the official
            ``max_num_renoise_steps_first_step``).
        average_below_t, average_low, average_high: the averaging windows (250, [0, 5), [8, 10));
            a window may reach past the last estimate, as the official ones do.
        inversion_guidance_scale, guidance_scale: w when inverting and when sampling (1, 1).
        noise_regularization: apply the regularisation (on, as the official RunConfig).
        lambda_ac, lambda_kl, num_reg_steps, num_ac_rolls: its weights and counts (20, 0.065, 4, 5).
    """

    name = "renoise"
    families = ("sd", "sdxl")

    def __init__(
        self,
        num_renoise_steps: int = 1,
        max_renoise_steps_low: int = 5,
        average_below_t: int = 250,
        average_low: Sequence[int] = (0, 5),
        average_high: Sequence[int] = (8, 10),
        inversion_guidance_scale: float = 1.0,
        guidance_scale: float = 1.0,
        noise_regularization: bool = True,
        lambda_ac: float = 20.0,
        lambda_kl: float = 0.065,
        num_reg_steps: int = 4,
        num_ac_rolls: int = 5,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(inversion_guidance_scale, guidance_scale, extra_guidance_scales)
        self.num_renoise_steps = check_int("num_renoise_steps", num_renoise_steps, 0)
        self.max_renoise_steps_low = check_int("max_renoise_steps_low", max_renoise_steps_low, 0)
        self.average_below_t = check_int("average_below_t", average_below_t, 0)
        self.average_low = self._window("average_low", average_low)
        self.average_high = self._window("average_high", average_high)
        self.noise_regularization = bool(check_choice("noise_regularization", noise_regularization, (True, False)))
        self.lambda_ac = check_float("lambda_ac", lambda_ac, 0.0)
        self.lambda_kl = check_float("lambda_kl", lambda_kl, 0.0)
        self.num_reg_steps = check_int("num_reg_steps", num_reg_steps, 0)
        self.num_ac_rolls = check_int("num_ac_rolls", num_ac_rolls, 1)

    @staticmethod
    def _window(name: str, window: Sequence[int]) -> tuple[int, int]:
        """[first, stop) of estimate indices, not empty; it may reach past the last estimate."""
        window = tuple(window)
        if len(window) != 2:
            raise SettingError(f"{name}={list(window)!r} is not allowed: a pair [first, stop) of estimate indices")
        first = check_int(f"{name}[0]", window[0], 0)
        stop = check_int(f"{name}[1]", window[1], first + 1)
        return first, stop

    def renoise_steps(self, t: int) -> int:
        """Renoising iterations of the step to timestep ``t``."""
        return min(self.num_renoise_steps, self.max_renoise_steps_low) if t < self.average_below_t else self.num_renoise_steps

    def unet_calls(self, t: int) -> int:
        return self.renoise_steps(t) + 1 + int(self.noise_regularization)

    def start(self, diffusion: Diffusion, z0: Tensor, seeds: list[int]) -> dict:
        if not self.noise_regularization:
            return {"z0": z0}
        return {"z0": z0, "noise": gaussian_like(z0, seeds), "rolls": [random.Random(s) for s in seeds]}

    def solve(self, diffusion: Diffusion, z_source: Tensor, t: int, uncond: Tensor, cond: Tensor, state: dict) -> Tensor:
        first, stop = self.average_low if t < self.average_below_t else self.average_high
        reference = None
        if self.noise_regularization:
            z_ref = diffusion.schedule.add_noise(state["z0"], state["noise"], t)
            reference = diffusion.noise_estimate(z_ref, t, uncond, cond, self.inversion_guidance_scale)
        # The official loop (renoise_inversion.py@fa83238 ~100-156): every estimate is computed
        # (~108); the RAW ones in the window go into the average (~141-146); an estimate with
        # index >= first is regularised before it moves the iterate (~148-151), the last one too
        # although the average's step then replaces its iterate (it still draws its rolls); the
        # average is regularised once (~154-156).
        window, z = [], z_source
        for j in range(self.renoise_steps(t) + 1):
            eps = diffusion.noise_estimate(z, t, uncond, cond, self.inversion_guidance_scale)
            if first <= j < stop:
                window.append(eps)
            if j >= first:
                eps = self.regularize(eps, reference, state)
            z = implicit_step(diffusion, z_source, eps, t)
        if not window:
            return z
        return implicit_step(diffusion, z_source, self.regularize(torch.stack(window).mean(0), reference, state), t)

    def regularize(self, eps: Tensor, reference: Tensor | None, state: dict) -> Tensor:
        """The noise regularisation of one batch of estimates (identity when it is off)."""
        if reference is None:
            return eps
        return torch.stack([self._regularize_one(e, r, rolls) for e, r, rolls in zip(eps, reference, state["rolls"])])

    def _regularize_one(self, eps: Tensor, reference: Tensor, rolls: random.Random) -> Tensor:
        with torch.enable_grad():
            for _ in range(self.num_reg_steps):
                if self.lambda_kl > 0:
                    var = eps.detach().requires_grad_()
                    (grad,) = torch.autograd.grad(patch_kl(var, reference), var)
                    eps = eps - self.lambda_kl * grad.clamp(-100, 100)
                if self.lambda_ac > 0:
                    for _ in range(self.num_ac_rolls):
                        var = eps.detach().requires_grad_()
                        (grad,) = torch.autograd.grad(autocorrelation_loss(var, rolls), var)
                        eps = eps - self.lambda_ac * grad / self.num_ac_rolls
        return eps.detach()


def patch_kl(eps: Tensor, reference: Tensor, patch: int = 4, epsilon: float = 1e-6) -> Tensor:
    """The official patch "KL" of two [C, h, w] tensors (renoise_inversion.py@fa83238 ~55-87,
    ``patchify_latents_kl_divergence``): per channel and ``patch`` x ``patch`` patch,
    |log((var_ref + e) / (var + e)) + (var + (mu - mu_ref)^2) / (var_ref + e) - 1| with e = ``epsilon``,
    summed. Without the 1/2 of the Gaussian KL, and the absolute value of each term."""

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        patches = x.unfold(1, patch, patch).unfold(2, patch, patch).flatten(-2)  # [C, h/p, w/p, p*p]
        return patches.mean(-1), patches.var(-1)

    (mu, var), (mu_ref, var_ref) = moments(eps), moments(reference)
    return (torch.log((var_ref + epsilon) / (var + epsilon)) + (var + (mu - mu_ref) ** 2) / (var_ref + epsilon) - 1).abs().sum()


def autocorrelation_loss(eps: Tensor, rolls: random.Random) -> Tensor:
    """pix2pix-zero's pair loss of a [C, h, w] noise map: squared autocorrelation at a random roll, per
    channel and per level of an average-pooling pyramid down to 8 x 8."""
    loss = eps.new_zeros(())
    for channel in eps:
        noise = channel[None, None]
        while True:
            shift = rolls.randrange(noise.shape[2] // 2)
            loss = loss + (noise * torch.roll(noise, shift, dims=2)).mean() ** 2 + (noise * torch.roll(noise, shift, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss
