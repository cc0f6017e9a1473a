"""Per-step pivotal optimisation: null-text inversion (Algorithm 1) and its pivot/caption/variable variants."""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion, guide
from nulltext.errors import CaptionError
from nulltext.methods.base import PAPER_ABLATION, Inversion, InversionMethod, Monitor, gaussian_like
from nulltext.validation import check_bool, check_choice, check_float, check_int, check_positive, check_probability

Precision = Literal["float32", "bf16", "tf32"]
PRECISIONS = ("float32", "bf16", "tf32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class NullTextInversion(InversionMethod):
    """Null-text inversion, per step (Mokady et al. 2023, Algorithm 1; ALGORITHM.md section 4).

    For each sampler step i (t = T ... 1), starting from z_bar = z*_T and null_0 = psi(""):
    a fresh Adam on null_i (warm-started from null_{i-1}) with lr = lr0 (1 - i * lr_decay) takes up
    to ``num_inner_steps`` steps on || z_{t-1}(z_bar, null_i, C) - z*_{t-1} ||^2 (eq. 3), the
    guided step at w; after a step, stop early if the pre-step loss < epsilon + slope * i.
    Then z_bar advances with the stored null_i, never reset to the pivot.

    Family-agnostic: the pivot is the family's inversion at w = 1 (DDIM inversion; reverse Euler on
    SD3) and the guided step its sampler's (DDIM; SD3's rectified-flow Euler with real classifier-free
    guidance). On SDXL and SD3 null_i is the whole negative context, its last row the pooled null
    embedding (:func:`nulltext.families.pack`), so both are optimised per step.

    The fast engine: batched, every image with its own embedding row, its own Adam moments (Adam is
    elementwise, so one [B, L, D] parameter equals B separate ones) and its own early stop (a
    stopped row is restored after every step, so it never moves again). The advance reuses the
    fixed branch's prediction (a batch of B instead of 2B). Equal in float32 to the official loop
    (:class:`~nulltext.methods.OfficialNullTextInversion`; ``tests/test_reference_engine.py``).

    Args:
        num_inner_steps: N, the most Adam steps per timestep (10 in the paper; >= 1).
        learning_rate: lr0 (0.01; finite, > 0).
        lr_decay: lr at step i is lr0 * (1 - i * lr_decay) (1/100 in the official code; in [0, 1]).
        early_stop_epsilon, early_stop_slope: the early-stop threshold epsilon + slope * i (finite
            numbers); a threshold <= 0 disables early stopping (and its host synchronisation).
        pivot_guidance_scale: guidance of the inversion (DDIM or reverse Euler) that makes the pivot (1 in the
            paper; its Fig. 9 sweeps 1 to 8; finite).
        static_batch: keep stopped images in the UNet batch (masked) instead of dropping them, so
            that every inner call has the same shape: what ``compile`` and CUDA graphs need. Off,
            stopped images leave the batch (fewer FLOPs, one host synchronisation per iteration).
        compile: ``torch.compile`` mode for the UNet calls of the loop (``"default"``,
            ``"reduce-overhead"`` = CUDA graphs, ``"max-autotune"``), or None for eager. Implies
            ``static_batch``.
        precision: arithmetic of the inner optimisation's UNet calls: ``"float32"`` (the paper's),
            ``"bf16"`` (bfloat16 autocast) or ``"tf32"`` (TensorFloat-32 matmuls, CUDA only). The
            pivot and the advance stay float32. Reduced precisions are options only: see
            docs/benchmarks.md for their measured PSNR against float32.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass of the
            inner loop instead of keeping them (diffusers' ``enable_gradient_checkpointing``, on for
            the loop only): less memory for one more forward per iteration, the same embeddings to
            float rounding. With ``model.dtype=bf16`` / ``fp16`` (half-precision weights; the
            embeddings and Adam stay float32) it is the memory option for SDXL at 1024 px.
    """

    name = "null_text"
    families = ("sd", "sdxl", "sd3")
    not_applicable = {"flux": "FLUX-dev is guidance-distilled (guidance is an input of the model): no unconditional branch, no null embedding to optimise"}
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
        static_batch: bool = False,
        compile: str | None = None,
        precision: Precision = "float32",
        gradient_checkpointing: bool = False,
    ):
        super().__init__(extra_guidance_scales)
        self.gradient_checkpointing = check_bool("inversion.gradient_checkpointing", gradient_checkpointing)
        self.precision = check_choice("inversion.precision", precision, PRECISIONS)
        self.compile = check_choice("inversion.compile", compile, (None, *COMPILE_MODES))
        self.pivot_guidance_scale = check_float("inversion.pivot_guidance_scale", pivot_guidance_scale)
        self.num_inner_steps = check_int("inversion.num_inner_steps", num_inner_steps, 1)
        self.learning_rate = check_positive("inversion.learning_rate", learning_rate)
        self.lr_decay = check_probability("inversion.lr_decay", lr_decay)
        self.early_stop_epsilon = check_float("inversion.early_stop_epsilon", early_stop_epsilon)
        self.early_stop_slope = check_float("inversion.early_stop_slope", early_stop_slope)
        # A changing batch would recompile.
        self.static_batch = check_bool("inversion.static_batch", static_batch) or compile is not None
        self._compiled: tuple[torch.nn.Module, Callable] | None = None

    def pivot(self, diffusion: Diffusion, z0: Tensor, cond: Tensor, null: Tensor, seeds: list[int]) -> Tensor:
        """The trajectory to retrace: the family's inversion (DDIM, reverse Euler), at w = 1 by default (ALGORITHM.md section 3)."""
        return diffusion.ddim_inversion(z0, cond, null, self.pivot_guidance_scale)

    def inversion_prompts(self, prompts: list[str], seeds: list[int]) -> list[str]:
        return prompts

    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        prompts = self.inversion_prompts(prompts, seeds)
        cond, null = diffusion.encode_prompts(prompts)
        pivot = self.pivot(diffusion, z0, cond, null, seeds)
        with self._checkpointing(diffusion.unet):
            uncond, cond_steps, iterations = self.optimise(diffusion, pivot, null, cond)
        return self.pivot_record(pivot, uncond, cond_steps, prompts, diffusion.guidance_scale, iterations)

    def unet_call(self, diffusion: Diffusion) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``(z, t, context) -> UNet output``: eager, or the UNet compiled once per model."""
        if self.compile is None:
            return diffusion.model_output
        if self._compiled is None or self._compiled[0] is not diffusion.unet:
            compiled = torch.compile(diffusion.unet, mode=self.compile, dynamic=False)
            self._compiled = (diffusion.unet, lambda z, t, c: diffusion.denoise(compiled, z, t, c))
        return self._compiled[1]

    def optimise(self, diffusion: Diffusion, pivot: Tensor, null: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Run the per-step loop; returns (uncond, cond) as [B,S,L,D] or [B,1,L,D] and iterations per image."""
        schedule, w = diffusion.schedule, diffusion.guidance_scale
        num_steps = schedule.num_steps
        optimise_uncond = self.variable == "uncond"
        current, fixed = (null, cond) if optimise_uncond else (cond, null)
        current = current.detach().clone()
        z_bar = pivot[:, -1].clone()
        iterations = torch.zeros(pivot.shape[0], dtype=torch.long, device=pivot.device)
        unet = self.unet_call(diffusion)
        stored = []
        for i, t in enumerate(schedule.timesteps):
            t_unet = torch.tensor(t, device=z_bar.device)  # one host-to-device copy per step, not per call
            with torch.no_grad():
                out_fixed = unet(z_bar, t_unet, fixed).clone()  # clone: CUDA-graph outputs are reused
            lr = self.learning_rate * (1.0 - i * self.lr_decay)
            threshold = self.early_stop_epsilon + self.early_stop_slope * i
            target = pivot[:, num_steps - 1 - i]
            current = self._inner_loop(unet, schedule, w, t, t_unet, z_bar, out_fixed, current, target, lr, threshold, iterations)
            stored.append(current)
            with torch.no_grad():  # the advance: guided step with the stored embedding
                z_bar = schedule.denoise_step(self._guided(unet(z_bar, t_unet, current), out_fixed, w), t, z_bar)
        per_step = torch.stack(stored, dim=1)
        shared = fixed.unsqueeze(1)
        counts = iterations.tolist()
        return (per_step, shared, counts) if optimise_uncond else (shared, per_step, counts)

    def _inner_loop(
        self, unet, schedule, w: float, t: int, t_unet: Tensor, z_bar: Tensor, out_fixed: Tensor,
        start: Tensor, target: Tensor, lr: float, threshold: float, iterations: Tensor,
    ) -> Tensor:
        """Up to N Adam steps on every image's embedding at one timestep; returns the embeddings [B, L, D]."""
        batch = start.shape[0]
        emb = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([emb], lr=lr, fused=emb.is_cuda or None)
        active = torch.ones(batch, dtype=torch.bool, device=emb.device)
        rows = slice(None)
        for _ in range(self.num_inner_steps):
            if not self.static_batch:
                rows = active.nonzero().squeeze(1)
            z_in = z_bar[rows]
            with torch.enable_grad():
                with self._precision(z_bar.device):
                    out_var = unet(z_in, t_unet, emb[rows]).float()
                z_prev = schedule.denoise_step(self._guided(out_var, out_fixed[rows], w), t, z_in)
                losses = (z_prev - target[rows]).pow(2).flatten(1).mean(1)  # F.mse_loss per image
                (emb.grad,) = torch.autograd.grad(losses.sum(), emb)
            before = emb.detach().clone()
            optimizer.step()
            with torch.no_grad():
                emb.copy_(torch.where(active[:, None, None], emb, before))  # stopped rows stay put
                iterations += active
                if threshold > 0:
                    active[rows] &= ~(losses < threshold)
            if threshold > 0 and not active.any():
                break
        return emb.detach()

    def _guided(self, out_var: Tensor, out_fixed: Tensor, w: float) -> Tensor:
        """Guidance with the optimised embedding's output on its side (uncond for null-text)."""
        out_u, out_c = (out_var, out_fixed) if self.variable == "uncond" else (out_fixed, out_var)
        return guide(out_u, out_c, w)

    @contextlib.contextmanager
    def _checkpointing(self, unet: torch.nn.Module) -> Iterator[None]:
        """Gradient checkpointing of the denoiser for the optimisation when asked (it acts only where gradients are taken: the inner loop), off again after it."""
        if not self.gradient_checkpointing:
            yield
            return
        unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            unet.disable_gradient_checkpointing()

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if self.precision == "tf32":
            return float32_matmul_precision("high")
        return contextlib.nullcontext()


@contextlib.contextmanager
def float32_matmul_precision(level: str) -> Iterator[None]:
    """Set ``torch.set_float32_matmul_precision`` for a block ("high" = TF32 on CUDA) and restore it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class RandomPivotNullText(NullTextInversion):
    """Ablation: the pivot is forward noising q(z_t | z_0) with ONE fixed noise draw per image."""

    name = "random_pivot"
    families = ("sd",)
    not_applicable = {"sdxl": PAPER_ABLATION}

    def pivot(self, diffusion: Diffusion, z0: Tensor, cond: Tensor, null: Tensor, seeds: list[int]) -> Tensor:
        noise = gaussian_like(z0, seeds)
        noised = [diffusion.schedule.add_noise(z0, noise, t) for t in reversed(diffusion.timesteps)]
        return torch.stack([z0, *noised], dim=1)


class RandomCaptionNullText(NullTextInversion):
    """Ablation: null-text inversion with the caption of another image of the dataset (seeded)."""

    name = "random_caption"
    families = ("sd",)
    not_applicable = {"sdxl": PAPER_ABLATION}

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
    families = ("sd",)
    not_applicable = {
        "sdxl": PAPER_ABLATION,
        "flux": "FLUX-dev is guidance-distilled (guidance is an input of the model): no classifier-free guided sampling for the caption to retrace the pivot with",
    }
    variable = "cond"
