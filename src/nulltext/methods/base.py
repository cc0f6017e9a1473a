"""The common interface of inversion methods and the record they return."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor

from nulltext.diffusion import Diffusion, SamplingHooks
from nulltext.validation import SettingError, check_float


# Why the null-text paper's ablation baselines do not run on SDXL (their not_applicable entry).
PAPER_ABLATION = "an ablation of the null-text paper (its Fig. 4), set up on SD only; null_text runs on SDXL"


@dataclass
class Inversion:
    """Everything needed to reconstruct (and later edit) a batch of B images.

    Reconstruction is guided DDIM sampling from ``z_T`` with ``uncond[:, i]`` / ``cond[:, i]`` at
    step i (second axis of length S, or 1 when one embedding serves every step), at
    ``guidance_scale``. ``uncond is None`` means no sampling: the reconstruction is decode(z_T)
    (the VAE bound). Methods with a sampler of their own name themselves in ``method`` (their
    :meth:`InversionMethod.reconstruct` then runs) and keep what it needs in ``settings`` (JSON
    values) and ``extras`` (tensors batched on axis 0); artifacts store all three.
    """

    z_T: Tensor
    uncond: Tensor | None
    cond: Tensor | None
    prompts: list[str]
    guidance_scale: float
    iterations: list[int]
    pivot: Tensor | None = None  # [B, S+1, C, h, w], index 0 = z_0, when the method has a pivot
    extra_guidance_scales: tuple[float, ...] = ()
    # Per-image loss after every optimisation pass or report interval, for methods that record one.
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    method: str | None = None  # name in METHODS of the method that samples it; None: guided DDIM
    settings: dict = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def select(self, b: int) -> "Inversion":
        """The record of image ``b`` alone (a batch of one)."""
        pick = lambda x: None if x is None else x[b : b + 1]  # noqa: E731
        return Inversion(
            z_T=pick(self.z_T),
            uncond=pick(self.uncond),
            cond=pick(self.cond),
            prompts=[self.prompts[b]],
            guidance_scale=self.guidance_scale,
            iterations=[self.iterations[b]],
            pivot=pick(self.pivot),
            extra_guidance_scales=self.extra_guidance_scales,
            curves={k: [v[b]] for k, v in self.curves.items()},
            method=self.method,
            settings=self.settings,
            extras={k: pick(v) for k, v in self.extras.items()},
        )


# Called by long-running methods with the inversion as it stands (its ``iterations`` so far), so
# that one run reports its whole convergence curve (paper Fig. 4) instead of one run per budget.
Monitor = Callable[["Inversion"], None]


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed that depends on the run seed and the image id only (not on the batch)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_like(z: Tensor, seeds: Sequence[int]) -> Tensor:
    """One standard-normal draw per image, each from its own seed (batch-size independent)."""
    draws = [torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(draws).to(z)


class InversionMethod(ABC):
    """One inversion method: ``invert`` maps VAE latents and captions to an :class:`Inversion`.

    Methods never touch model weights (the pipeline is frozen) and never depend on how images
    are batched: every per-image random draw uses :func:`image_seed`.

    Args:
        extra_guidance_scales: also reconstruct at these guidance scales and report their PSNR
            (e.g. DDIM inversion sampled at w = 1 as well as at 7.5); a list of finite numbers.

    Every constructor checks its settings (:mod:`nulltext.validation`), so a bad value stops a run
    with one line before any model loads; the names in the messages are the config keys
    (``inversion.<setting>``).
    """

    name: ClassVar[str]
    # The model families (nulltext.families.FAMILIES) the method runs on; on another one a run stops
    # with one line before any model loads (nulltext.methods.check_family).
    families: ClassVar[tuple[str, ...]] = ("sd",)
    # Why it does not run on a family it leaves out (family -> one short reason; subclasses inherit
    # entries). A family not given here gets a generic reason (nulltext.methods.not_applicable_reason).
    not_applicable: ClassVar[dict[str, str]] = {}
    # Whether ``nulltext edit`` can apply Prompt-to-Prompt to its inversions; if not, what to use.
    editable: ClassVar[bool] = True
    edit_instead: ClassVar[str] = ""

    def __init__(self, extra_guidance_scales: Sequence[float] = ()):
        if isinstance(extra_guidance_scales, (str, bytes)) or not isinstance(extra_guidance_scales, Sequence):
            raise SettingError(f"inversion.extra_guidance_scales={extra_guidance_scales!r} is not allowed: a list of numbers, e.g. [1.0]")
        self.extra_guidance_scales = tuple(check_float("inversion.extra_guidance_scales", w) for w in extra_guidance_scales)

    def pivot_record(
        self, pivot: Tensor, uncond: Tensor, cond: Tensor, prompts: list[str], guidance_scale: float,
        iterations: int | list[int] = 0, **fields,
    ) -> Inversion:
        """The inversion sampled from the end of ``pivot`` ([B, S+1, C, h, w], z_0 first).

        ``uncond`` and ``cond`` are [B, L, D] (one embedding for every step) or [B, S, L, D] (one
        per step); ``iterations`` one count for every image or a list; ``fields`` the rest of
        :class:`Inversion` (``method``, ``settings``, ``extras``, ``curves``).
        """
        per_step = lambda e: e if e.dim() == 4 else e.unsqueeze(1)  # noqa: E731
        counts = iterations if isinstance(iterations, list) else [iterations] * len(prompts)
        return Inversion(
            z_T=pivot[:, -1],
            uncond=per_step(uncond),
            cond=per_step(cond),
            prompts=prompts,
            guidance_scale=guidance_scale,
            iterations=counts,
            pivot=pivot,
            extra_guidance_scales=self.extra_guidance_scales,
            **fields,
        )

    def prepare(self, captions: Sequence[str]) -> None:
        """Called once with every caption of the dataset before inverting (most methods ignore it)."""

    @abstractmethod
    def invert(
        self, diffusion: Diffusion, z0: Tensor, prompts: list[str], seeds: list[int], monitor: Monitor | None = None
    ) -> Inversion:
        """Invert a batch: ``z0`` [B,C,h,w] VAE latents, one caption and one seed per image.

        Methods that optimise for many iterations call ``monitor`` along the way (the others ignore it).
        """

    @classmethod
    def sampling_hooks(cls, diffusion: Diffusion, inversion: Inversion, rows: int) -> SamplingHooks | None:
        """How this method changes guided DDIM sampling of ``inversion`` (None: it does not).

        ``rows`` prompts share each image (1 to reconstruct; source plus targets to edit).
        """
        return None

    @classmethod
    def reconstruct(cls, diffusion: Diffusion, inversion: Inversion, guidance_scale: float) -> Tensor:
        """The sampled trajectory [B, S+1, C, h, w] (index 0 = z_T) that reconstructs ``inversion``.

        Guided DDIM sampling from z_T with the inversion's embeddings (ALGORITHM.md section 5) and
        the method's :meth:`sampling_hooks`; methods with another sampler override it. A class
        method: an artifact reconstructs from its stored ``settings`` and ``extras`` alone.
        """
        hooks = cls.sampling_hooks(diffusion, inversion, rows=1)
        return diffusion.sample(inversion.z_T, inversion.uncond, inversion.cond, guidance_scale, hooks=hooks)

    def config(self) -> dict:
        """The method's settings, recorded in every artifact."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}
