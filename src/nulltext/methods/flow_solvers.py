"""Inversions of rectified-flow models (SD3, FLUX) with their own ODE steps: RF-Inversion, RF-Solver, FireFlow.

Conventions of :mod:`nulltext.flow`: the model's velocity u(z, t) = dz/dsigma at the time input
t = 1000 sigma; sampling runs sigma_0 = 1 > ... > sigma_S = 0, inversion the other way. Each method
inverts with its own step and reconstructs with its own sampler (its ``reconstruct``), so that an
artifact reproduces its reconstruction through ``nulltext reconstruct``; ``pivot`` is the inversion's
trajectory (index 0 = z_0), against which the runner records the reconstruction's latent error per step.
docs/flow_methods.md has the equations, the published defaults, the costs and the official code.

Editing: the official codes edit by sampling with the target prompt (RF-Solver and FireFlow with
their feature sharing in the transformer); Prompt-to-Prompt is ported to the UNet of SD 1/2 only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, InversionMethod, Monitor, gaussian_like
from nulltext.validation import SettingError, check_float

# u(z, t): a velocity at the time input t (1000 sigma)
Velocity = Callable[[Tensor, float], Tensor]


def guided_velocity(diffusion: Diffusion, uncond: Tensor, cond: Tensor, guidance_scale: float) -> Velocity:
    """u(z, t) with guidance w: classifier-free for SD3, FLUX's guidance input for FLUX (:meth:`Diffusion.guided_output`)."""
    return lambda z, t: diffusion.guided_output(z, t, uncond, cond, guidance_scale)


def intervals(diffusion: Diffusion, invert: bool) -> list[tuple[float, float]]:
    """The (time input where a step starts, signed sigma step h) of every step, in the order they run.

    Sampling: from sigma_i by h = sigma_{i+1} - sigma_i < 0; inversion: from sigma_{i+1} by -h, i = S-1 .. 0.
    """
    schedule = diffusion.schedule
    down = [(schedule.levels[i], schedule.steps[i]) for i in range(schedule.num_steps)]
    if not invert:
        return down
    return [(schedule.levels[i + 1], -h) for i, (_, h) in reversed(list(enumerate(down)))]


class _MidpointSolver(InversionMethod):
    """RF-Solver and FireFlow: one step rule, used both ways with the same schedule.

    Inversion runs the step upwards at ``inversion_guidance_scale`` (the official codes' FLUX guidance
    input 1; on SD3, w = 1 is the conditional velocity alone); reconstruction runs it downwards from
    z_T at the sampler's w, by default also at w = 1 (``extra_guidance_scales``), which retraces the
    inversion up to the steps' error.
    """

    families = ("sd3", "flux")
    editable = False
    edit_instead = "Prompt-to-Prompt runs on SD 1.x/2.x models only"

    def __init__(self, inversion_guidance_scale: float = 1.0, extra_guidance_scales: Sequence[float] = (1.0,)):
        super().__init__(extra_guidance_scales)
        self.inversion_guidance_scale = check_float("inversion.inversion_guidance_scale", inversion_guidance_scale)

    @classmethod
    def step(cls, velocity: Velocity, z: Tensor, t: float, h: float, carried: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One step from time input ``t`` by sigma step ``h``: (z', what the next step reuses)."""
        raise NotImplementedError

    @classmethod
    def integrate(cls, velocity: Velocity, z: Tensor, steps: list[tuple[float, float]]) -> list[Tensor]:
        """The latents after each of ``steps`` (``intervals``), ``z`` first."""
        latents, carried = [z], None
        for t, h in steps:
            z, carried = cls.step(velocity, z, t, h, carried)
            latents.append(z)
        return latents

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        diffusion.check_latents(z0)
        cond, null = diffusion.encode_prompts(prompts)
        velocity = guided_velocity(diffusion, null, cond, self.inversion_guidance_scale)
        pivot = torch.stack(self.integrate(velocity, z0, intervals(diffusion, invert=True)), dim=1)
        return self.pivot_record(pivot, null, cond, prompts, diffusion.guidance_scale, method=self.name)

    @classmethod
    @torch.no_grad()
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        diffusion.check_latents(inversion.z_T)
        velocity = guided_velocity(diffusion, inversion.uncond[:, 0], inversion.cond[:, 0], guidance_scale)
        return torch.stack(cls.integrate(velocity, inversion.z_T, intervals(diffusion, invert=False)), dim=1)


class RFSolverInversion(_MidpointSolver):
    """RF-Solver (Wang et al., "Taming Rectified Flow for Inversion and Editing", ICML 2025).

    A second-order Taylor step of the flow ODE, the derivative of the velocity from a half-step
    evaluation (2 model evaluations per step, both ways), from time s by h:

        u = u(z, s);  u_mid = u(z + h/2 u, s + h/2)
        z' = z + h u + 1/2 h^2 (u_mid - u) / (h/2)

    Official: wangjiangshan0725/RF-Solver-Edit@ccb2d211 FLUX_Image_Edit/src/flux/sampling.py:100-134 (``denoise``),
    guidance input 1 for inversion, edit.py's defaults 25 steps and guidance 5 for sampling.
    """

    name = "rf_solver"

    @classmethod
    def step(cls, velocity, z, t, h, carried):
        """Both velocities evaluated afresh, nothing carried (sampling.py:107-134)."""
        u = velocity(z, t)
        u_mid = velocity(z + h / 2 * u, t + 1000 * h / 2)
        return z + h * u + 0.5 * h**2 * ((u_mid - u) / (h / 2)), None


class FireFlowInversion(_MidpointSolver):
    """FireFlow (Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing", ICML 2025).

    The midpoint step with the velocity at the step's start taken from the previous step's midpoint
    evaluation (re-evaluated only at the first step of each direction): 1 model evaluation per step,
    S + 1 for S steps, from time s by h:

        u = u_mid of the previous step (first step: u(z, s));  u_mid = u(z + h/2 u, s + h/2)
        z' = z + h u_mid

    Official code (HolmesShuan/FireFlow), read in a fork of it:
    cyteena/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing@313f2475
    src/flux/sampling.py:185-248 (``denoise_fireflow``); guidance input 1 for inversion;
    src/inversion_reconstruction.sh reconstructs with 10 steps at guidance 1.
    """

    name = "fireflow"

    @classmethod
    def step(cls, velocity, z, t, h, carried):
        """The previous step's midpoint velocity as this one's start (evaluated when None); carries u_mid (sampling.py:216-246)."""
        u = velocity(z, t) if carried is None else carried
        u_mid = velocity(z + h / 2 * u, t + 1000 * h / 2)
        return z + h * u_mid, u_mid


class RFInversion(InversionMethod):
    """RF-Inversion (Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic
    Differential Equations", ICLR 2025): a controlled forward ODE to noise, a controlled reverse ODE back.

    Inversion (the paper's Algorithm 1) pulls the flow towards a fixed noise sample y_1 (one per image,
    from its seed) with the controller gamma; it uses the velocity u_0 of the empty prompt, with FLUX's
    guidance input ``source_guidance_scale`` (0), as the community pipeline does by default. Step i of S,
    t_i = i / (S + 1):

        u_hat = u_0(Y, 1000 t_i) + gamma ((y_1 - Y) / (1 - t_i) - u_0(Y, 1000 t_i))
        Y' = Y + (sigma_i - sigma_{i+1}) u_hat

    Transcribed as the pipeline has it: time inputs on the linear grid i / (S + 1), step sizes the
    sampler's from the top of the schedule down. Reconstruction (Algorithm 2) samples from Y_S = z_T
    with the caption at the sampler's w and, at steps start <= i < stop (int(start_timestep S),
    int(stop_timestep S)), pulls towards the image latent y_0 (kept in the artifact) with eta:

        u_hat = u_w(z, t_i) + eta ((z - y_0) / sigma_i - u_w(z, t_i));   z' = z + (sigma_{i+1} - sigma_i) u_hat

    (the pipeline's v = -u, v_cond = (y_0 - z) / (1 - t_i), 1 - t_i = sigma_i). With eta = 1 over all
    steps the reconstruction is y_0 whatever z_T: faithfulness traded against editability.
    1 model evaluation per step both ways (2 rows per step when SD3 samples with guidance).

    Official: the authors' README (LituRout/RF-Inversion@07fd03e6 README.md) runs diffusers' community
    pipeline, huggingface/diffusers@0036ae2a examples/community/pipeline_flux_rf_inversion.py:
    ``RFInversionFluxPipeline.invert`` (Algorithm 1; source prompt "" and guidance 0 by default) and
    ``__call__`` (Algorithm 2), with 28 steps, gamma 0.5, eta 0.9, start 0, stop 7/28 (= 0.25, also
    the signature's stop; the signature's eta is 1.0, the docstring example's stop 0.38).
    """

    name = "rf_inversion"
    families = ("sd3", "flux")
    editable = False
    edit_instead = "Prompt-to-Prompt runs on SD 1.x/2.x models only; RF-Inversion edits by sampling with the target prompt"

    def __init__(
        self,
        gamma: float = 0.5,
        eta: float = 0.9,
        start_timestep: float = 0.0,
        stop_timestep: float = 0.25,
        source_guidance_scale: float = 0.0,
        extra_guidance_scales: Sequence[float] = (),
    ):
        super().__init__(extra_guidance_scales)
        self.gamma = check_float("inversion.gamma", gamma, 0.0, 1.0)
        self.eta = check_float("inversion.eta", eta, 0.0, 1.0)
        self.start_timestep = check_float("inversion.start_timestep", start_timestep, 0.0, 1.0)
        self.stop_timestep = check_float("inversion.stop_timestep", stop_timestep, 0.0, 1.0)
        if self.stop_timestep < self.start_timestep:
            raise SettingError(
                f"inversion.stop_timestep={stop_timestep!r} is before inversion.start_timestep={start_timestep!r}: "
                "the controlled steps are start <= i / steps < stop"
            )
        self.source_guidance_scale = check_float("inversion.source_guidance_scale", source_guidance_scale)

    @staticmethod
    def forward_step(diffusion: Diffusion, i: int, Y: Tensor, y_1: Tensor, context: Tensor, gamma: float, guidance: float) -> Tensor:
        """Step i of the controlled forward ODE (pipeline_flux_rf_inversion.py, ``invert``'s loop after "Eq 8")."""
        schedule = diffusion.schedule
        t_i = i / (schedule.num_steps + 1)
        u = diffusion.model_output(Y, 1000 * t_i, context, guidance)
        u_hat = u + gamma * ((y_1 - Y) / (1 - t_i) - u)
        return Y + (schedule.sigmas[i] - schedule.sigmas[i + 1]) * u_hat

    @staticmethod
    def reverse_step(
        diffusion: Diffusion, i: int, z: Tensor, y_0: Tensor, uncond: Tensor, cond: Tensor, guidance_scale: float, eta: float
    ) -> Tensor:
        """Sampling step i, ``eta`` its controller (0 outside start..stop) (``__call__``'s ``if do_rf_inversion`` branch)."""
        schedule = diffusion.schedule
        t = schedule.timesteps[i]
        u = diffusion.guided_output(z, t, uncond, cond, guidance_scale)
        return schedule.denoise_step(u + eta * ((z - y_0) / schedule.sigmas[i] - u), t, z)

    @staticmethod
    def controlled(diffusion: Diffusion, settings: dict) -> range:
        """The sampling steps the controller acts on: start_timestep S <= i < stop_timestep S."""
        steps = diffusion.schedule.num_steps
        return range(int(settings["start_timestep"] * steps), min(int(settings["stop_timestep"] * steps), steps))

    @torch.no_grad()
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        diffusion.check_latents(z0)
        cond, null = diffusion.encode_prompts(prompts)
        y_1 = gaussian_like(z0, seeds)
        latents = [z0]
        for i in range(diffusion.schedule.num_steps):
            latents.append(self.forward_step(diffusion, i, latents[-1], y_1, null, self.gamma, self.source_guidance_scale))
        pivot = torch.stack(latents, dim=1)
        return self.pivot_record(
            pivot, null, cond, prompts, diffusion.guidance_scale,
            method=self.name,
            settings={"eta": self.eta, "start_timestep": self.start_timestep, "stop_timestep": self.stop_timestep},
            extras={"y_0": z0},
        )

    @classmethod
    @torch.no_grad()
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        diffusion.check_latents(inversion.z_T)
        settings, y_0 = inversion.settings, inversion.extras["y_0"]
        controlled = cls.controlled(diffusion, settings)
        latents = [inversion.z_T]
        for i in range(diffusion.schedule.num_steps):
            eta = settings["eta"] if i in controlled else 0.0
            latents.append(cls.reverse_step(diffusion, i, latents[-1], y_0, inversion.uncond[:, 0], inversion.cond[:, 0], guidance_scale, eta))
        return torch.stack(latents, dim=1)
