"""Host time to make one training batch of the pocket recipe: what keeps a GPU waiting.

    python scripts/profile_pocket_batches.py                  # the GPU recipe's batches, timed on this CPU
    python scripts/profile_pocket_batches.py --device cuda    # device stages on the GPU

Times (best of ``--repeats``, milliseconds) the stages of :mod:`nulltext.pocket.batches`' ``unet_batch``
(the recipe's batch of 1024 at 64 px) and ``vae_batch`` (64): the host part (``unet_batch_host``:
layouts and token ids with caption dropout, index tensors on the CPU) and the stages that run on the
training device (rendering, photo crops, noise fields). The host part is what a GPU waits for; on a
CPU the device stages are CPU work too, listed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def best_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (caches, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def profile(cfg, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    from nulltext.models import clip_tokenizer
    from nulltext.pocket import batches
    from nulltext.scenes import LayoutTokenizer, sample_layout

    u, v = cfg.unet_train, cfg.vae_train
    tokens = LayoutTokenizer(clip_tokenizer())
    layout = sample_layout(u.batch_size, 1)
    photos = batches.PhotoCrops(v.photo_source_resolution, list(v.holdout_photos), device)
    g = torch.Generator().manual_seed(0)
    n_photo = int(round(v.batch_size * v.photo_fraction))
    unet = {
        "host: layout": best_ms(lambda: sample_layout(u.batch_size, 1), repeats, device),
        "host: token ids": best_ms(lambda: tokens(layout), repeats, device),
        "host part (unet_batch_host)": best_ms(lambda: batches.unet_batch_host(cfg, 1, tokens), repeats, device),
        "device: rendering": best_ms(lambda: batches.scene_images(layout, cfg.resolution, device), repeats, device),
        "whole unet_batch": best_ms(lambda: batches.unet_batch(cfg, 1, tokens, device), repeats, device),
    }
    vae = {
        "host: scene layout": best_ms(lambda: sample_layout(v.batch_size, 1), repeats, device),
        f"device: {n_photo} photo crops (one roi_align)": best_ms(lambda: photos(n_photo, cfg.resolution, g, v.photo_min_crop), repeats, device),
        "whole vae_batch": best_ms(lambda: batches.vae_batch(cfg, 1, "vae", photos, device), repeats, device),
    }
    return {f"unet_batch ({u.batch_size} at {cfg.resolution} px)": unet, f"vae_batch ({v.batch_size})": vae}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="train_pocket")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = p.parse_args(argv)
    from hydra import compose, initialize_config_dir

    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=args.config_name, overrides=args.overrides)
    device = torch.device(args.device)
    result = profile(cfg, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"| stage ({name}, {args.threads} thread(s), best of {args.repeats}) | ms |\n|---|---|")
    for batch, stages in result.items():
        for stage, ms in stages.items():
            print(f"| {batch}: {stage} | {ms:.2f} |")
    return result


if __name__ == "__main__":
    main()
