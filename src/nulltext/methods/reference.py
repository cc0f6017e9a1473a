"""The reference engine: the official null-text loop as written (the speed baseline and a test oracle).

``OfficialNullTextInversion`` runs ALGORITHM.md section 4 the way the official notebook
(google/prompt-to-prompt, ``null_text_w_ptp.ipynb``, ``NullInversion.null_optimization``) does,
including what the fast engine (:class:`~nulltext.methods.NullTextInversion`) removes:

- one image at a time (a batch is a Python loop over its images, so batch size cannot matter);
- float32, no autocast;
- model parameters NOT frozen: every weight has ``requires_grad=True`` during the run, so each
  ``loss.backward()`` also computes and accumulates the UNet weight gradients (the official code
  zeroes only the embedding's gradient; the UNet's grow for the whole loop, ~3.4 GB at SD1.4 size);
- explicit attention (diffusers' ``AttnProcessor``: baddbmm + softmax, no SDPA) on the UNet;
- per timestep: the conditional prediction once under no_grad, the unconditional with autograd
  on a batch of one, ``F.mse_loss``, a fresh Adam on a [1, L, D] embedding, the early-stop test
  after the step, and the advance as one batched [uncond; cond] UNet call under no_grad.

Everything the run changed is restored afterwards: ``requires_grad`` and ``.grad`` of every
parameter of the UNet, VAE and text encoder, and the UNet's attention processors. The UNet is
called directly (not through ``Diffusion.model_output``), so speed-ups added to the shared helpers
never leak into the baseline; the DDIM arithmetic is :class:`~nulltext.ddim.DDIMSchedule`'s (tested
against diffusers' schedulers in ``tests/test_ddim.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from torch import Tensor

from nulltext.diffusion import Diffusion
from nulltext.methods.base import Inversion, Monitor
from nulltext.methods.null_text import NullTextInversion
from nulltext.validation import SettingError


@contextmanager
def official_model_state(diffusion: Diffusion) -> Iterator[None]:
    """Unfreeze every pipeline weight and put explicit attention on the UNet; restore both on exit.

    Restores, per parameter, the ``requires_grad`` flag and the ``.grad`` tensor it had on entry
    (so the weight gradients accumulated by the official loop are dropped), and the UNet's
    previous attention processors (whatever they were: SDPA, or an editing controller's).
    """
    modules = [m for m in (diffusion.unet, diffusion.vae, diffusion.text_encoder) if m is not None]
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    saved = [(p.requires_grad, p.grad) for p in params]
    processors = dict(diffusion.unet.attn_processors)
    try:
        diffusion.unet.set_attn_processor(AttnProcessor())
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, (flag, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(flag)
        diffusion.unet.set_attn_processor(processors)


class OfficialNullTextInversion(NullTextInversion):
    """Null-text inversion exactly as the official code runs it: the baseline of every speed figure.

    Same settings and same result (up to float32 rounding) as :class:`NullTextInversion`, which
    batches images, freezes the weights and uses SDPA attention. Slow on purpose; use it for speed
    ratios and as a test oracle, not for experiments.
    """

    name = "null_text_reference"
    families = ("sd",)
    not_applicable = {"sdxl": "the official notebook's loop on SD 1.4, kept as the speed baseline and test oracle; null_text runs on SDXL"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.static_batch or self.compile is not None or self.precision != "float32":
            raise SettingError(
                "null_text_reference runs the official loop (eager, float32, one image at a time): "
                "static_batch, compile and precision are options of null_text, the fast engine"
            )

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        if self.variable != "uncond":
            raise NotImplementedError("the reference engine optimises the null text only")
        dtypes = {p.dtype for p in diffusion.unet.parameters()} | {z0.dtype}
        if dtypes != {torch.float32}:
            raise ValueError(f"the reference engine runs in float32; got {sorted(map(str, dtypes))}")
        prompts = self.inversion_prompts(prompts, seeds)
        records = []
        with official_model_state(diffusion), torch.autocast(z0.device.type, enabled=False):
            for b, prompt in enumerate(prompts):
                records.append(self._invert_one(diffusion, z0[b : b + 1], prompt))
        pivot = torch.cat([r[0] for r in records])
        uncond, cond = torch.cat([r[1] for r in records]), torch.cat([r[2] for r in records])
        return self.pivot_record(pivot, uncond, cond, prompts, diffusion.guidance_scale, [r[3] for r in records])

    def optimise(self, diffusion: Diffusion, pivot: Tensor, null: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """The parent's interface, one image at a time with the official loop (weights unfrozen)."""
        results = []
        with official_model_state(diffusion), torch.autocast(pivot.device.type, enabled=False):
            for b in range(pivot.shape[0]):
                results.append(self._null_optimization(diffusion, pivot[b : b + 1], null[b : b + 1], cond[b : b + 1]))
        uncond = torch.cat([r[0] for r in results])
        return uncond, cond.unsqueeze(1), [r[1] for r in results]

    # -- one image --------------------------------------------------------------------------
    def _invert_one(self, diffusion: Diffusion, z0: Tensor, prompt: str) -> tuple[Tensor, Tensor, Tensor, int]:
        cond = diffusion.encode_text([prompt])  # [1, L, D], under no_grad (official init_prompt)
        null = diffusion.encode_text([""])
        pivot = self._ddim_loop(diffusion, z0, cond, null)
        uncond, iterations = self._null_optimization(diffusion, pivot, null, cond)
        return pivot, uncond, cond, iterations

    @staticmethod
    def _eps(diffusion: Diffusion, z: Tensor, t: int, context: Tensor) -> Tensor:
        return diffusion.unet(z, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def _ddim_loop(self, diffusion: Diffusion, z0: Tensor, cond: Tensor, null: Tensor) -> Tensor:
        """The pivot [1, S+1, C, h, w]: DDIM inversion with the conditional prediction only (w = 1)."""
        schedule = diffusion.schedule
        w = getattr(self, "pivot_guidance_scale", 1.0)
        latents, z = [z0], z0.clone()
        for t in reversed(schedule.timesteps):
            t_unet = t if diffusion.inversion_timestep == "target" else max(t - schedule.step_ratio, 0)
            if w == 1.0:
                out = self._eps(diffusion, z, t_unet, cond)
            else:  # the pivot-guidance ablation: one [null; cond] call, as get_noise_pred does
                out_u, out_c = self._eps(diffusion, torch.cat([z, z]), t_unet, torch.cat([null, cond])).chunk(2)
                out = out_u + w * (out_c - out_u)
            z = schedule.invert_step(out, t, z)
            latents.append(z)
        return torch.stack(latents, dim=1)

    def _null_optimization(self, diffusion: Diffusion, pivot: Tensor, null: Tensor, cond: Tensor) -> tuple[Tensor, int]:
        """``NullInversion.null_optimization`` for one image: returns ([1, S, L, D] nulls, iterations)."""
        schedule, w = diffusion.schedule, diffusion.guidance_scale
        num_steps = schedule.num_steps
        uncond = null.detach().clone()
        z_bar = pivot[:, -1].detach().clone()
        stored, iterations = [], 0
        for i, t in enumerate(schedule.timesteps):
            uncond = uncond.clone().detach()
            uncond.requires_grad = True
            optimizer = torch.optim.Adam([uncond], lr=self.learning_rate * (1.0 - i * self.lr_decay))
            target = pivot[:, num_steps - 1 - i]
            with torch.no_grad():
                eps_c = self._eps(diffusion, z_bar, t, cond)
            threshold = self.early_stop_epsilon + self.early_stop_slope * i
            for _ in range(self.num_inner_steps):
                with torch.enable_grad():
                    eps_u = self._eps(diffusion, z_bar, t, uncond)
                    z_prev = schedule.denoise_step(eps_u + w * (eps_c - eps_u), t, z_bar)
                    loss = F.mse_loss(z_prev, target)
                    optimizer.zero_grad()  # the embedding's only: the UNet's gradients accumulate
                    loss.backward()
                optimizer.step()
                iterations += 1
                if loss.item() < threshold:
                    break
            stored.append(uncond[:1].detach())
            with torch.no_grad():
                eps_u, eps_c2 = self._eps(diffusion, torch.cat([z_bar, z_bar]), t, torch.cat([uncond, cond])).chunk(2)
                z_bar = schedule.denoise_step(eps_u + w * (eps_c2 - eps_u), t, z_bar)
        return torch.stack(stored, dim=1), iterations
