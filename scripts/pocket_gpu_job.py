"""One device call: train the pocket model's UNet + text encoder, evaluate it on the GPU, pack it.

    python scripts/pocket_gpu_job.py --out "$OUT"                       # repository root, CUDA machine
    python scripts/pocket_gpu_job.py --out DIR --minutes 8 unet_train.steps=900   # Hydra overrides last

Nothing written on a lent device machine survives the call, so every step depends on this call only:

1. the imports it needs are checked first (one line naming what is missing, before any work);
2. ``conf/train_pocket.yaml`` trains a fresh UNet + text encoder on the committed autoencoder
   (``vae_from``) within ``--minutes`` less ``--reserve`` (kept for steps 3 and 4); when the budget
   runs out the EMA weights are exported as they stand;
3. the text-control and attention parts of ``scripts/evaluate_pocket_model.py`` run on the device;
4. at most 8 files of at most ``--part-mib`` MiB each are written into ``--out``: the exported
   model folder as a tar split into ``pocket.tar.part-00``, ``-01``, ..., the training curves,
   the evaluation JSON and markdown, and ``job.json`` (timings, settings, versions).

Back on a machine with the repository: ``cat DIR/pocket.tar.part-* | tar xf - -C models`` unpacks
``models/pocket/`` (the model card and ``eval/`` there are not in the archive and stay).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what one device call may bring back


def load_script(name: str):
    """A sibling script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_everything():
    """Import what the job uses, before any work; a missing package ends the job with one line."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    try:
        import torch  # noqa: F401

        from nulltext.models import clip_tokenizer

        clip_tokenizer()  # needs open_clip_torch's vocabulary file
        return load_script("train_pocket_model"), load_script("evaluate_pocket_model")
    except ImportError as error:
        sys.exit(f"pocket_gpu_job: error: cannot import {error.name or error}: carry its wheel (shared/tools/gpu-wheels.sh) and put it on PYTHONPATH")
    except Exception as error:  # e.g. the tokenizer's vocabulary missing
        sys.exit(f"pocket_gpu_job: error: {error}")


def tar_bytes(folder: Path) -> bytes:
    """``folder`` as an uncompressed tar, its entries under ``folder.name/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def run_job(cfg, out: Path, minutes: float, reserve: float, device: str, part_mib: float, eval_args: list[str], modules=None) -> dict:
    """Train within ``minutes - reserve``, evaluate on ``device``, write at most 8 files into ``out``."""
    train_module, eval_module = modules or import_everything()
    from omegaconf import OmegaConf, open_dict

    from nulltext.provenance import provenance

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"pocket_gpu_job: error: --out {out} is not empty")
    work = Path(tempfile.mkdtemp(prefix="pocket-job-"))
    with open_dict(cfg):
        cfg.device = device
        cfg.output_dir = str(work / "pocket")
        cfg.run_dir = str(work / "run")
        cfg.resume = False
        cfg.max_minutes = min(float(cfg.max_minutes or minutes), minutes - reserve)
    if cfg.max_minutes <= 0:
        raise SystemExit(f"pocket_gpu_job: error: --minutes {minutes} leaves no training time after --reserve {reserve}")
    model = train_module.train(cfg)
    if model is None:
        raise SystemExit("pocket_gpu_job: error: training stopped before exporting a model")
    trained_min = (time.monotonic() - t0) / 60

    evaluation = eval_module.main(["--model", str(model), "--out", str(work / "eval"), "--device", device, *eval_args])
    evaluated_min = (time.monotonic() - t0) / 60

    archive, part_bytes = tar_bytes(model), int(part_mib * 2**20)
    extra = {"curves.csv": work / "run" / "curves.csv", "pocket_eval.json": work / "eval" / "pocket_eval.json", "pocket_eval.md": work / "eval" / "pocket_eval.md"}
    starts = range(0, len(archive), part_bytes)
    if len(starts) + len(extra) + 1 > MAX_FILES:
        raise SystemExit(f"pocket_gpu_job: error: {len(starts)} archive parts + {len(extra) + 1} files exceed {MAX_FILES}: raise --part-mib")
    parts = [out / f"{model.name}.tar.part-{k:02d}" for k in range(len(starts))]
    for path, start in zip(parts, starts):
        path.write_bytes(archive[start : start + part_bytes])
    for name, source in extra.items():
        (out / name).write_bytes(source.read_bytes())
    training = json.loads((model / "training.json").read_text())
    job = {
        "minutes": {"training_step": round(trained_min, 2), "evaluation_step": round(evaluated_min - trained_min, 2), "total": round((time.monotonic() - t0) / 60, 2)},
        "budget": {"minutes": minutes, "reserve": reserve, "training_max_minutes": cfg.max_minutes},
        "unet_steps_done": training["unet_steps_done"],
        "unet_steps_planned": int(cfg.unet_train.steps),
        "samples_seen": training["samples_seen"],
        "device": device,
        "checks": evaluation["checks"],
        "archive": [p.name for p in parts],
        "unpack": f"cat {parts[0].parent.name}/{model.name}.tar.part-* | tar xf - -C models",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(),
    }
    (out / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    print(json.dumps({k: job[k] for k in ("minutes", "unet_steps_done", "unet_steps_planned", "checks", "archive")}, indent=2), flush=True)
    return job


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
    modules = import_everything()
    import torch
    from hydra import compose, initialize_config_dir

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("pocket_gpu_job: error: no CUDA device here: run it on the GPU machine, or give --device cpu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=args.config_name, overrides=args.overrides)
    eval_args = ["--text-images", str(args.text_images), "--attention-images", str(args.attention_images),
                 "--vae-images", "0", "--inv-images", "0", "--photos"]
    return run_job(cfg, Path(args.out), args.minutes, args.reserve, args.device, args.part_mib, eval_args, modules)


if __name__ == "__main__":
    main()
