"""Training batches of the pocket recipe, drawn on the training device from seeds of (seed, phase, step).

The autoencoder sees procedural scenes (:func:`nulltext.scenes.sample_layout` ``split="train"``),
random crops of the offline photos (:class:`PhotoCrops`; a few photos held out for evaluation) and
1/f-noise colour fields; the UNet sees scenes and their token ids, a share of them replaced by the
empty caption (classifier-free guidance).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from nulltext.pocket.recipe import data_seed, step_generator
from nulltext.scenes import LayoutTokenizer, SceneLayout, render_layout, sample_layout


class PhotoCrops:
    """Random crops of the offline photos (held-out ids excluded), resized to the training resolution."""

    def __init__(self, source_resolution: int, holdout: list[str], device: torch.device):
        from nulltext.data import SAMPLE_IDS, SampleImages

        names = [n for n in SAMPLE_IDS if n not in set(holdout)]
        dataset = SampleImages(resolution=source_resolution, names=names)
        images = []
        for i in range(len(dataset)):
            try:
                images.append(dataset[i]["image"])
            except Exception as error:  # a missing wheel: train without that photo
                print(f"photo {names[i]} unavailable ({error}); skipped", flush=True)
        self.images = torch.stack(images).to(device).float() if images else None
        self.ids = names

    def __call__(self, n: int, resolution: int, g: torch.Generator, min_crop: float) -> torch.Tensor:
        """n crops in [-1, 1], float [n,3,R,R]; crop side uniform in [min_crop, 1] of the photo side,
        half of them flipped. One ``roi_align`` call for the batch: each output pixel averages the
        crop's pixels under it (adaptive sampling), so shrinking a large crop does not alias."""
        from torchvision.ops import roi_align

        src = self.images
        size = src.shape[-1]
        u = torch.rand(n, 5, generator=g, device=g.device).to(src.device)
        k = (u[:, 0] * len(src)).long().clamp_(max=len(src) - 1)
        side = (size * (min_crop + (1 - min_crop) * u[:, 1])).clamp(min=resolution, max=size)
        top, left = u[:, 2] * (size - side), u[:, 3] * (size - side)
        boxes = torch.stack([k.float(), left, top, left + side, top + side], dim=1)
        crops = roi_align(src, boxes, output_size=resolution, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        crops = torch.where((u[:, 4] < 0.5)[:, None, None, None], crops.flip(-1), crops)
        return (crops / 127.5 - 1).clamp(-1, 1)


def noise_fields(n: int, resolution: int, g: torch.Generator) -> torch.Tensor:
    """Photo-like 1/f^alpha colour noise in [-1, 1], float [n,3,R,R] (alpha uniform in [1.5, 2.5])."""
    device = g.device
    fy = torch.fft.fftfreq(resolution, device=device)[:, None]
    fx = torch.fft.rfftfreq(resolution, device=device)[None, :]
    f = (fx**2 + fy**2).sqrt().clamp_min(1.0 / resolution)
    alpha = 1.5 + torch.rand(n, 1, 1, 1, generator=g, device=device)
    spec = torch.randn(n, 3, resolution, resolution // 2 + 1, 2, generator=g, device=device)
    spec = torch.view_as_complex(spec) / f**alpha
    x = torch.fft.irfft2(spec, s=(resolution, resolution))
    mix = torch.randn(n, 3, 3, generator=g, device=device) * 0.5 + torch.eye(3, device=device)
    x = torch.einsum("ncd,ndhw->nchw", mix, x)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    x = x / x.flatten(1).std(1)[:, None, None, None].clamp_min(1e-6) * 0.45
    x = x + (torch.rand(n, 3, 1, 1, generator=g, device=device) - 0.5)
    return x.clamp(-1, 1)


def scene_images(layout, resolution: int, device: torch.device) -> torch.Tensor:
    """A layout drawn on the training device, float in [-1, 1]."""
    return render_layout(layout, resolution, device).float() / 127.5 - 1


def vae_batch(cfg: DictConfig, step: int, phase: str, photos: PhotoCrops | None, device: torch.device) -> torch.Tensor:
    v = cfg.vae_train
    g = step_generator(cfg.seed, phase, step)
    n = v.batch_size
    n_photo = int(round(n * v.photo_fraction)) if photos is not None and photos.images is not None else 0
    n_noise = int(round(n * v.noise_fraction))
    n_scene = n - n_photo - n_noise
    parts = [scene_images(sample_layout(n_scene, data_seed(cfg.seed, phase, step)), cfg.resolution, device)]
    if n_photo:
        parts.append(photos(n_photo, cfg.resolution, g, v.photo_min_crop))
    if n_noise:
        parts.append(noise_fields(n_noise, cfg.resolution, g).to(device))
    return torch.cat(parts)


def unet_batch_host(cfg: DictConfig, step: int, tokens: LayoutTokenizer) -> tuple[SceneLayout, torch.Tensor, torch.Tensor]:
    """The host part of a UNet batch, CPU tensors only: the scenes' layout, their token ids (a
    ``caption_dropout`` share replaced by the empty caption's, for classifier-free guidance) and
    which rows were dropped. Index tensors and one table gather per caption part: no per-sample Python."""
    u = cfg.unet_train
    layout = sample_layout(u.batch_size, data_seed(cfg.seed, "unet", step))
    ids = tokens(layout)
    drop = torch.rand(u.batch_size, generator=torch.Generator().manual_seed(data_seed(cfg.seed, "unet", step))) < u.caption_dropout
    ids[drop] = tokens.empty
    return layout, ids, drop


def unet_batch(cfg: DictConfig, step: int, tokens: LayoutTokenizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes in [-1, 1] rendered on ``device`` and their token ids there."""
    layout, ids, _ = unet_batch_host(cfg, step, tokens)
    return scene_images(layout, cfg.resolution, device), ids.to(device, non_blocking=True)
