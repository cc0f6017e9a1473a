"""The notebook API: ``load_pipeline`` and ``invert`` one image, no Hydra or Lightning involved."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from nulltext import models
from nulltext.artifacts import open_artifact
from nulltext.data import load_image, preprocess_image
from nulltext.diffusion import Diffusion
from nulltext.methods import Inversion, image_seed, make_method
from nulltext.metrics import load_lpips, score_uint8
from nulltext.models import pipeline_resolution
from nulltext.reconstruction import reconstruct, to_uint8

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "model"


def load_pipeline(name_or_path: str = "pocket", **overrides) -> StableDiffusionPipeline:
    """A frozen float32 pipeline: a model config name (``tiny``, ``sd14``, ...), a hub id or a local folder."""
    config_file = MODEL_CONFIGS / f"{name_or_path}.yaml"
    if "/" not in name_or_path and config_file.exists():
        return instantiate(OmegaConf.merge(OmegaConf.load(config_file), overrides))
    return models.load_pipeline(name_or_path, **overrides)


@dataclass
class InversionResult:
    """One inverted image.

    ``null_embeddings`` is [S, L, D] (one per timestep; a shared one is repeated) and
    ``reconstruction`` the sampled image; ``inversion`` is the full record for editing and saving.
    """

    z_T: Tensor
    null_embeddings: Tensor
    reconstruction: Image.Image
    metrics: dict
    inversion: Inversion


def invert(
    pipe: StableDiffusionPipeline,
    image: str | Path | Image.Image,
    prompt: str,
    method: str = "null_text",
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    caption_pool: list[str] | None = None,
    **overrides,
) -> InversionResult:
    """Invert one image with one method (``overrides`` set the method's options, e.g. num_inner_steps=20)."""
    diffusion = Diffusion(pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    inverter = make_method(method, **overrides)
    inverter.prepare(caption_pool or [])
    resolution = pipeline_resolution(pipe)
    load = preprocess_image if isinstance(image, Image.Image) else load_image
    pixels = load(image, resolution).unsqueeze(0).to(diffusion.device)
    z0 = diffusion.encode_images(pixels)
    start = time.perf_counter()
    with torch.enable_grad():
        inversion = inverter.invert(diffusion, z0, [prompt], [image_seed(seed, "image")])
    seconds = time.perf_counter() - start
    recon = reconstruct(diffusion, inversion).images
    lpips_model, lpips_spec = load_lpips("alex", device=diffusion.device)
    scores = score_uint8(lpips_model, recon, pixels)
    vae_psnr = score_uint8(lpips_model, to_uint8(diffusion.decode(z0)), pixels).psnr
    metrics = {
        "psnr": scores.psnr.item(),
        "lpips": scores.lpips.item(),
        "ssim": scores.ssim.item(),
        "vae_psnr": vae_psnr.item(),
        "iterations": inversion.iterations[0],
        "seconds": seconds,
        "lpips_spec": lpips_spec,
    }
    uncond = inversion.uncond[0] if inversion.uncond is not None else torch.empty(0)
    null_embeddings = uncond.expand(diffusion.schedule.num_steps, *uncond.shape[1:]) if uncond.shape[:1] == (1,) else uncond
    return InversionResult(
        z_T=inversion.z_T[0],
        null_embeddings=null_embeddings,
        reconstruction=Image.fromarray(recon[0].permute(1, 2, 0).cpu().numpy()),
        metrics=metrics,
        inversion=inversion,
    )


def reconstruct_artifact(path: str | Path) -> Image.Image:
    """Re-create the reconstruction stored in an inversion artifact (``inversions/<id>.safetensors``),
    with the model and sampler it records; a damaged or missing artifact is a FileError naming the file."""
    inversion, _, diffusion = open_artifact(path)
    images = reconstruct(diffusion, inversion).images
    return Image.fromarray(images[0].permute(1, 2, 0).cpu().numpy())
