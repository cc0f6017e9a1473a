"""One device call: train the pocket model's UNet + text encoder, evaluate it on the GPU, pack it.

    python scripts/pocket_gpu_job.py --out "$OUT"                       # repository root, CUDA machine
    python scripts/pocket_gpu_job.py --out DIR --minutes 8 unet_train.steps=900   # Hydra overrides last

The job is :func:`nulltext.pocket.job.run_job`. Nothing written on a lent device machine survives
the call, so every step depends on this call only:

1. the imports it needs are checked first (one line naming what is missing, before any work);
2. ``conf/train_pocket.yaml`` trains a fresh UNet + text encoder on the committed autoencoder
   (``vae_from``), with the token-grounding loss (``grounding.weight``), within ``--minutes`` less
   ``--reserve`` (kept for steps 3 and 4); when the budget runs out the EMA weights are exported as
   they stand;
3. the text-control and attention parts of :mod:`nulltext.pocket.evaluation` run on the device;
4. at most 8 files of at most ``--part-mib`` MiB each are written into ``--out``: the exported
   model folder as a tar split into ``pocket.tar.part-00``, ``-01``, ..., the training curves,
   the evaluation JSON and markdown, and ``job.json`` (timings, settings, versions).

Back on a machine with the repository: ``cat DIR/pocket.tar.part-* | tar xf - -C models`` unpacks
``models/pocket/`` (the model card and ``eval/`` there are not in the archive and stay).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_everything():
    """Import what the job uses, before any work; a missing package ends the job with one line."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    try:
        import torch  # noqa: F401

        from nulltext.models import clip_tokenizer
        from nulltext.pocket import job

        clip_tokenizer()  # needs open_clip_torch's vocabulary file
        return job
    except ImportError as error:
        sys.exit(f"pocket_gpu_job: error: cannot import {error.name or error}: carry its wheel (shared/tools/gpu-wheels.sh) and put it on PYTHONPATH")
    except Exception as error:  # e.g. the tokenizer's vocabulary missing
        sys.exit(f"pocket_gpu_job: error: {error}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="empty folder for what comes back (the device call's $OUT)")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole job's budget: training gets this less --reserve")
    p.add_argument("--reserve", type=float, default=1.5, help="minutes kept for evaluation and packing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--part-mib", type=float, default=15.0, help="size of each archive part (the device returns files up to 16 MiB)")
    p.add_argument("--text-images", type=int, default=48)
    p.add_argument("--attention-images", type=int, default=8)
    p.add_argument("--config-name", default="train_pocket")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = p.parse_args(argv)
    job = import_everything()
    import torch
    from hydra import compose, initialize_config_dir

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("pocket_gpu_job: error: no CUDA device here: run it on the GPU machine, or give --device cpu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=args.config_name, overrides=args.overrides)
    eval_args = ["--text-images", str(args.text_images), "--attention-images", str(args.attention_images),
                 "--vae-images", "0", "--inv-images", "0", "--photos"]
    return job.run_job(cfg, Path(args.out), args.minutes, args.reserve, args.device, args.part_mib, eval_args)


if __name__ == "__main__":
    main()
