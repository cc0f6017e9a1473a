"""Edit metrics that work offline: background preservation, edit footprint, and CLIP score when possible.

Background preservation compares an edit with the reconstruction (and with the input, when there
is one) outside the edited region, the way PIE-Bench reports it:

- PSNR: mean squared error over background pixels only (all three channels);
- SSIM: torchmetrics' SSIM map (Gaussian 11x11, sigma 1.5) averaged over background pixels;
- LPIPS: both images with the edited region set to 0 (black) before LPIPS (the PIE-Bench recipe);
  the LPIPS spec (net, input range, weights) is recorded next to the numbers.

The edited region is the local-blend mask of each edit, or a mask given by the user; with neither,
the whole image counts as background (``mask: "none"``). The footprint is the fraction of pixels
whose largest channel difference to the reconstruction exceeds a threshold (in [0, 1] units).

CLIP score (100 * cosine of image and text embeddings, clamped at 0, as torchmetrics' CLIPScore)
is computed only with a local CLIP model (``clip_model`` = a folder written by
``CLIPModel.save_pretrained``); otherwise it is ``null`` with a reason -- never a guessed number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from nulltext.editing.errors import EditError
from nulltext.metrics import load_lpips, lpips_per_image

CLIP_UNAVAILABLE = "unavailable offline"


def _weights(background: Tensor, images: Tensor) -> Tensor:
    return background.float().expand(images.shape[0], 1, *images.shape[-2:])


def masked_psnr(pred: Tensor, target: Tensor, background: Tensor) -> Tensor:
    """[B] PSNR (dB) over background pixels; images in [0, 1], background [B|1, 1, H, W] in {0, 1}."""
    weights = _weights(background, pred)
    squared = (pred.float() - target.float()).pow(2).mean(1, keepdim=True)
    mse = (squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1)
    return 10 * torch.log10(1 / mse)


def masked_ssim(pred: Tensor, target: Tensor, background: Tensor) -> Tensor:
    """[B] mean of the SSIM map over background pixels."""
    _, full = structural_similarity_index_measure(
        pred.float(), target.float(), data_range=1.0, return_full_image=True, reduction="none"
    )
    weights = _weights(background, pred)
    return (full.mean(1, keepdim=True) * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1)


def masked_lpips(model, pred: Tensor, target: Tensor, background: Tensor) -> Tensor:
    """[B] LPIPS with the edited region blacked out in both images."""
    weights = _weights(background, pred)
    return lpips_per_image(model, pred.float() * weights, target.float() * weights).cpu()


def edit_footprint(edits: Tensor, reference: Tensor, threshold: float = 0.1) -> Tensor:
    """[B] fraction of pixels whose largest channel change exceeds ``threshold`` (images in [0, 1])."""
    change = (edits.float() - reference.float()).abs().amax(1)
    return (change > threshold).float().mean(dim=(1, 2))


def load_mask(path: str | Path, size: tuple[int, int]) -> Tensor:
    """A user mask image -> [1, 1, H, W] float {0,1}, 1 = edited region (white); centre-cropped and resized like inputs."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"mask not found: {path}")
    try:
        with Image.open(path) as opened:
            gray = opened.convert("L")
    except Exception as error:  # PIL raises many types for bad files (OSError, SyntaxError, ...), as in data.load_image
        raise EditError(f"cannot read mask {path}: {' '.join(str(error).split())}; give a PNG or JPEG (white = edited)") from None
    w, h = gray.size
    side = min(w, h)
    gray = gray.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    gray = gray.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(gray) > 127).astype(np.float32))[None, None]


def clip_scores(images: Tensor, prompts: Sequence[str], clip_model: str | None) -> tuple[list[float] | None, str | None]:
    """CLIP scores of uint8 images [B,3,H,W] against their prompts, or (None, reason)."""
    if not clip_model:
        return None, CLIP_UNAVAILABLE
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
    except Exception as error:  # no local copy: say so, do not guess
        return None, f"{CLIP_UNAVAILABLE} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    pictures = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]
    inputs = processor(text=list(prompts), images=pictures, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    image_emb = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text_emb = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return (100 * (image_emb * text_emb).sum(-1)).clamp_min(0).tolist(), None


def finite_or_text(value: float) -> float | str:
    """JSON-safe number: identical images have infinite PSNR, written as the string "inf"."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")


def background_comparison(edits: Tensor, reference: Tensor, background: Tensor, lpips_model) -> list[dict]:
    """Per edit: PSNR, SSIM and LPIPS against ``reference`` over the ``background`` pixels (images in [0, 1])."""
    psnr = masked_psnr(edits, reference, background)
    ssim = masked_ssim(edits, reference, background)
    lp = masked_lpips(lpips_model, edits, reference, background)
    return [
        {"psnr": finite_or_text(psnr[k].item()), "ssim": ssim[k].item(), "lpips": lp[k].item()}
        for k in range(edits.shape[0])
    ]


def edit_metrics(
    images: Tensor,
    prompts: Sequence[str],
    *,
    input_image: Tensor | None = None,
    edited_region: Tensor | None = None,
    mask_source: str = "none",
    lpips_net: str = "alex",
    footprint_threshold: float = 0.1,
    clip_model: str | None = None,
) -> dict:
    """Metrics of an edit batch (uint8 [1+K,3,H,W], row 0 the reconstruction) against row 0 and the input.

    ``edited_region``: [K|1, 1, H, W] in {0,1} (1 = may change), or None for the whole image as background.
    """
    as_float = lambda x: x.float().cpu() / 255  # noqa: E731
    recon, edits = as_float(images[:1]), as_float(images[1:])
    num_edits = edits.shape[0]
    if edited_region is None:
        background = torch.ones(1, 1, *images.shape[-2:])
        mask_source = "none"
    else:
        background = 1 - edited_region.float().cpu()
        if background.shape[0] not in (1, num_edits):
            raise EditError(f"{background.shape[0]} masks for {num_edits} edits")
    lpips_model, lpips_spec = load_lpips(lpips_net)
    result: dict = {
        "mask": mask_source,
        "lpips": lpips_spec,
        "ssim": "torchmetrics structural_similarity_index_measure (gaussian 11, sigma 1.5, data_range 1), averaged over background pixels",
        "psnr": "over background pixels, images in [0,1]",
        "footprint_threshold": footprint_threshold,
        "edits": [],
    }
    if input_image is not None:
        target = as_float(input_image.reshape(1, *input_image.shape[-3:]))
        full = torch.ones(1, 1, *images.shape[-2:])
        result["reconstruction_vs_input"] = background_comparison(recon, target, full, lpips_model)[0]
    if num_edits == 0:
        return result
    vs_recon = background_comparison(edits, recon.expand_as(edits), background, lpips_model)
    vs_input = background_comparison(edits, as_float(input_image.reshape(1, *input_image.shape[-3:])).expand_as(edits), background, lpips_model) if input_image is not None else None
    footprint = edit_footprint(edits, recon.expand_as(edits), footprint_threshold)
    scores, reason = clip_scores(images[1:], prompts[1:], clip_model)
    fractions = background.expand(num_edits, 1, *images.shape[-2:]).mean(dim=(1, 2, 3))
    for k in range(num_edits):
        empty = fractions[k].item() == 0
        entry = {
            "prompt": prompts[k + 1],
            "background_fraction": fractions[k].item(),
            "background_vs_reconstruction": None if empty else vs_recon[k],
            "background_vs_input": None if empty or vs_input is None else vs_input[k],
            "footprint": footprint[k].item(),
            "clip_score": None if scores is None else scores[k],
        }
        if empty:
            entry["background_reason"] = "the edited region covers the whole image"
        if scores is None:
            entry["clip_score_reason"] = reason
        result["edits"].append(entry)
    return result
