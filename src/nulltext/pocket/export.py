"""The trained pocket model written as a ``StableDiffusionPipeline.save_pretrained`` folder."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from nulltext.models import SD_SCHEDULER_CONFIG, clip_tokenizer


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scaling_factor: float) -> StableDiffusionPipeline:
    """Copies of the modules as a float32 CPU pipeline with SD's DDIM scheduler (the inputs untouched)."""
    vae = copy.deepcopy(vae).cpu().float().eval()
    vae.register_to_config(scaling_factor=float(scaling_factor))
    return StableDiffusionPipeline(
        unet=copy.deepcopy(unet).cpu().float().eval(),
        vae=vae,
        text_encoder=copy.deepcopy(text_encoder).cpu().float().eval(),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_pipeline(pipe: StableDiffusionPipeline, out: Path, save_dtype: str, info: dict, vae_source: Path | None = None) -> Path:
    """Save ``pipe`` (weights in ``save_dtype``) with ``training.json`` = ``info`` into ``out``.

    Written beside the destination and renamed into place: a cut-short export never looks complete.
    ``vae_source``: an autoencoder folder shipped as it is, bit for bit, instead of ``pipe.vae``."""
    if save_dtype == "float16":
        pipe.to(torch.float16)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pipe.save_pretrained(staging, safe_serialization=True)
    compact_tokenizer(staging / "tokenizer", pipe.tokenizer.model_max_length)
    if vae_source is not None:  # untouched by training: ship its own files, bit for bit
        shutil.rmtree(staging / "vae")
        shutil.copytree(vae_source, staging / "vae")
    (staging / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's safetensors file(s), in name order."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def compact_tokenizer(folder: Path, context_length: int) -> None:
    """Replace the 3.6 MB ``tokenizer.json`` by the vocab.json + merges.txt it is built from (~2 MB);
    the tokenizer pads to ``context_length`` (``model_max_length``, what the stock pipeline pads to)."""
    src = Path(clip_tokenizer().name_or_path)
    if not (src / "vocab.json").exists():
        return
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, folder / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": int(context_length)}))
    (folder / "tokenizer.json").unlink(missing_ok=True)
