"""The notebook API: ``load_pipeline`` and ``invert`` one image, no Hydra or Lightning involved.

Arguments are checked as the command line checks its settings (the same checks), and errors name
the API's arguments (``num_inner_steps``), not the command line's settings (``inversion.num_inner_steps``).
"""

from __future__ import annotations

import difflib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from nulltext import models
from nulltext.artifacts import open_artifact
from nulltext.data import load_image, preprocess_image
from nulltext.diffusion import Diffusion
from nulltext.errors import UnknownNameError, user_error
from nulltext.families import family_of
from nulltext.methods import Inversion, check_family, image_seed, make_method
from nulltext.metrics import load_lpips, score_uint8
from nulltext.models import MODEL_CONFIG_DIR, model_configs, pipeline_resolution
from nulltext.reconstruction import reconstruct, to_uint8
from nulltext.validation import SettingError, check_seed, check_text


def load_pipeline(name_or_path: str = "pocket", **overrides) -> DiffusionPipeline:
    """A frozen float32 pipeline: a model config name (``tiny``, ``sd14``, ``tiny_xl``, ...), a hub id or a local folder."""
    check_text("name_or_path", name_or_path)
    if "/" not in name_or_path and name_or_path in model_configs():
        config = OmegaConf.load(MODEL_CONFIG_DIR / f"{name_or_path}.yaml")
        config.pop("defaults", None)  # the sampler config a model picks (Hydra's defaults list), not a setting
        try:
            return instantiate(OmegaConf.merge(config, overrides))
        except Exception as error:
            found = user_error(error)  # the one-line error, not Hydra's wrapping of it
            if found is None:
                raise
            raise found from None
    if name_or_path.count("/") != 1 and not Path(name_or_path).expanduser().exists():  # not a hub id either
        close = difflib.get_close_matches(name_or_path, model_configs(), n=1)
        raise UnknownNameError(
            f"unknown model {name_or_path!r}{f' (did you mean {close[0]!r}?)' if close else ''}: give one of the model configs "
            f"({', '.join(model_configs())}), a hub id like CompVis/stable-diffusion-v1-4 or a local pipeline folder"
        )
    return models.load_pipeline(name_or_path, **overrides)


def _in_api_terms(error: SettingError) -> SettingError:
    """The command line's name of a setting (diffusion.guidance_scale, inversion.num_inner_steps) as invert()'s argument."""
    return SettingError(re.sub(r"^(diffusion|inversion)\.", "", str(error)))


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


def family_sampler(pipe: DiffusionPipeline) -> dict:
    """The sampler settings (steps, guidance, inversion timestep) the command line uses for ``pipe``'s family."""
    config = OmegaConf.load(MODEL_CONFIG_DIR.parent / "diffusion" / f"{family_of(pipe).sampler_config()}.yaml")
    return {key: config[key] for key in ("num_inference_steps", "guidance_scale", "inversion_timestep")}


def invert(
    pipe: DiffusionPipeline,
    image: str | Path | Image.Image,
    prompt: str,
    method: str = "null_text",
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    caption_pool: list[str] | None = None,
    **overrides,
) -> InversionResult:
    """Invert one image with one method (``overrides`` set the method's options, e.g. num_inner_steps=20).

    The sampler is the one the command line picks for the pipeline's family (``conf/diffusion/``):
    DDIM 50 steps at w = 7.5 on SD and SDXL, rectified-flow Euler 28 steps at w = 7 on SD3, 28 at
    guidance 3.5 on FLUX-dev, 4 on FLUX-schnell; ``num_inference_steps`` and ``guidance_scale`` replace
    its values.
    """
    check_text("prompt", prompt)
    check_seed("seed", seed)
    if not isinstance(image, (str, os.PathLike, Image.Image)):
        raise SettingError(f"image={image!r} is not allowed: the path of an image file or a PIL image")
    resolution = pipeline_resolution(pipe)
    sampler = family_sampler(pipe)
    if num_inference_steps is not None:
        sampler["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        sampler["guidance_scale"] = guidance_scale
    try:
        diffusion = Diffusion(pipe, **sampler, resolution=resolution)
        inverter = make_method(method, **overrides)
    except SettingError as error:
        raise _in_api_terms(error) from None
    check_family(inverter, diffusion.family.name)
    inverter.prepare(caption_pool or [])
    if isinstance(image, Image.Image):
        pixels = preprocess_image(image, resolution)
    else:
        pixels = load_image(image, resolution, missing_hint="give the path of an image file")
    pixels = pixels.unsqueeze(0).to(diffusion.device)
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
