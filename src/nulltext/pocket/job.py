"""The pocket model's one-call GPU job: train the UNet + text encoder, evaluate on the device, pack.

Nothing written on a lent device machine survives the call, so every step depends on this call only:
``conf/train_pocket.yaml`` trains a fresh UNet + text encoder on the committed autoencoder
(``vae_from``) within ``minutes`` less ``reserve`` (kept for evaluation and packing; when the budget
runs out the EMA weights are exported as they stand); the text-control and attention parts of
:mod:`nulltext.pocket.evaluation` run on the device; at most 8 files of at most ``part_mib`` MiB each
are written into ``out``: the exported model folder as a tar split into ``pocket.tar.part-00``,
``-01``, ..., the training curves, the evaluation JSON and markdown, and ``job.json`` (timings,
settings, versions). ``scripts/pocket_gpu_job.py`` is the command line.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from nulltext.pocket.evaluation import main as evaluate
from nulltext.pocket.trainer import train
from nulltext.provenance import provenance

MAX_FILES = 8  # what one device call may bring back


def tar_bytes(folder: Path) -> bytes:
    """``folder`` as an uncompressed tar, its entries under ``folder.name/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def run_job(cfg, out: Path, minutes: float, reserve: float, device: str, part_mib: float, eval_args: list[str]) -> dict:
    """Train within ``minutes - reserve``, evaluate on ``device``, write at most 8 files into ``out``."""
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
    model = train(cfg)
    if model is None:
        raise SystemExit("pocket_gpu_job: error: training stopped before exporting a model")
    trained_min = (time.monotonic() - t0) / 60

    evaluation = evaluate(["--model", str(model), "--out", str(work / "eval"), "--device", device, *eval_args])
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
