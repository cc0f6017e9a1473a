"""What an inversion costs: UNet evaluations counted on the UNet itself, and peak memory.

Both work on any ``torch.nn.Module`` and any code path (a method's own loop, diffusers' pipelines,
an editing controller), with or without Lightning:

    with UNetCounter(pipe.unet) as unet_calls, PeakMemory(device) as memory:
        inversion = method.invert(diffusion, z0, prompts, seeds)
    unet_calls.rows, memory.mib

Counting convention: one UNet *evaluation* is one row of a UNet batch. A call on a batch of B
latents is B evaluations; classifier-free guidance on the doubled batch [uncond; cond] is 2B, so
2 per image; an inversion of B images together costs ``rows / B`` evaluations per image.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

CUDA_PEAK = "torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats: peak of tensor memory on the GPU (weights included), MiB"
CPU_PEAK = "peak resident set size of the process (Linux VmHWM, reset through /proc/self/clear_refs at the start), MiB"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class UNetCounter:
    """Counts the rows of every forward call of ``unet`` (a forward pre-hook; nothing is patched).

    ``rows`` is the number of UNet evaluations since the counter was made (see the module's
    convention). Use as a context manager, or call :meth:`remove`. Calls made inside
    :meth:`paused` are not counted (e.g. evaluations a run does for its own curves). A UNet run
    through ``torch.compile`` (null-text's ``compile`` option) has not been checked to fire the hook.
    """

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        self._paused = False
        self._handle = unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._paused:
            # The latents: a UNet's first argument or ``sample``; SD3's and FLUX's transformers' ``hidden_states``.
            sample = args[0] if args else kwargs["sample" if "sample" in kwargs else "hidden_states"]
            self.rows += sample.shape[0]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "UNetCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PeakMemory:
    """The peak memory of a block of code on ``device``, in MiB (``mib``; None where not measurable).

    CUDA: the allocator's peak of tensor memory (:data:`CUDA_PEAK`), so other processes and the
    allocator's cache do not count. CPU: the process's peak resident set size over the block
    (:data:`CPU_PEAK`), which includes the weights, Python and what the allocator kept from earlier
    work: compare methods run in the same conditions only. Where Linux's peak reset is unavailable,
    ``mib`` is None (the lifetime ``ru_maxrss`` would say nothing about the block).
    ``definition`` (:func:`peak_memory_definition`) says what was measured.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.definition = peak_memory_definition(self.device)
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.definition == CUDA_PEAK:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.definition == CPU_PEAK:
            _CLEAR_REFS.write_text("5")  # Linux >= 4.0: peak RSS := current RSS
        return self

    def __exit__(self, *exc) -> None:
        if self.definition == CUDA_PEAK:
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.definition == CPU_PEAK:
            self.mib = peak_rss_kib() / 1024


def peak_memory_definition(device: torch.device | str) -> str | None:
    """What :class:`PeakMemory` measures on ``device``: :data:`CUDA_PEAK`, :data:`CPU_PEAK`, or None (nothing)."""
    device = torch.device(device)
    if device.type == "cuda":
        return CUDA_PEAK
    if device.type == "cpu" and sys.platform.startswith("linux") and os.access(_CLEAR_REFS, os.W_OK):
        return CPU_PEAK
    return None


def peak_rss_kib() -> int:
    """The process's peak RSS in KiB since the last reset (VmHWM of /proc/self/status)."""
    line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1])
