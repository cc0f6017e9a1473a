"""Inversion artifacts: ``<id>.safetensors`` (tensors) plus ``<id>.json`` (everything else).

An artifact holds what reconstruction needs -- z_T, the per-step (or shared) embeddings, and for
methods with a sampler of their own its name, settings and tensors (``extras.<name>``) -- and the
settings that made it, so ``nulltext reconstruct`` or :func:`load_artifact` reproduces the
reconstruction exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nulltext.io import atomic_write, atomic_write_json
from nulltext.methods.base import Inversion

FORMAT_VERSION = 1
EXTRAS = "extras."  # prefix of a method's own tensors in the safetensors file


def invalidate_artifact(stem: str | Path) -> None:
    """Remove an artifact's JSON, its completion marker, before any of its files is rewritten: a
    process killed while rewriting then leaves no old JSON beside new tensors (or images)."""
    Path(stem).with_suffix(".json").unlink(missing_ok=True)


def save_artifact(stem: str | Path, inversion: Inversion, metadata: dict) -> Path:
    """Write one image's inversion (a batch of one). The JSON marks completeness: an old one is
    removed first (:func:`invalidate_artifact`) and the new one is written last."""
    stem = Path(stem)
    invalidate_artifact(stem)
    tensors = {"z_T": inversion.z_T[0]}
    if inversion.uncond is not None:
        tensors["uncond"] = inversion.uncond[0]
        tensors["cond"] = inversion.cond[0]
    tensors.update({EXTRAS + k: v[0] for k, v in inversion.extras.items()})
    # clone: safetensors refuses tensors that share storage (negative-prompt uses one for both).
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    record = {
        "format_version": FORMAT_VERSION,
        "prompt": inversion.prompts[0],
        "guidance_scale": inversion.guidance_scale,
        "iterations": inversion.iterations[0],
        "sampler": {"method": inversion.method, "settings": inversion.settings},
        **metadata,
    }
    return atomic_write_json(stem.with_suffix(".json"), record)


def load_artifact(path: str | Path) -> tuple[Inversion, dict]:
    """Read an artifact written by :func:`save_artifact`; ``path`` may name either file or the stem."""
    stem = Path(path)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    record = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    with_batch = {k: v.unsqueeze(0) for k, v in tensors.items()}
    inversion = Inversion(
        z_T=with_batch["z_T"],
        uncond=with_batch.get("uncond"),
        cond=with_batch.get("cond"),
        prompts=[record["prompt"]],
        guidance_scale=record["guidance_scale"],
        iterations=[record["iterations"]],
        method=record.get("sampler", {}).get("method"),
        settings=record.get("sampler", {}).get("settings", {}),
        extras={k[len(EXTRAS) :]: v for k, v in with_batch.items() if k.startswith(EXTRAS)},
    )
    return inversion, record
