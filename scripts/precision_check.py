#!/usr/bin/env python
"""Is a reduced precision of the fast engine safe? Reconstruction PSNR against float32, one process.

Issue 6's rule: bf16 autocast and TF32 are offered as options of ``NullTextInversion(precision=...)``
only if null-text inversion with them reconstructs within 0.1 dB of float32 (mean PSNR against the
input) on the offline model's samples. This script inverts the same images at every precision
(same method settings, same seeds), reconstructs every result in float32, and prints per precision
the mean PSNR, its difference from float32, the largest per-image difference, the seconds per image
and the verdict. Markdown to stdout and ``--out``, raw numbers to ``--out`` with ``.json``.

Images: the offline sample photos and held-out procedural scenes at the model's resolution.

Examples::

    python scripts/precision_check.py --out docs/precision_cpu.md            # CPU, pocket model
    python scripts/precision_check.py --device cuda --out $OUT/precision.md  # the GPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

import torch

from nulltext.api import load_pipeline
from nulltext.data import SampleImages
from nulltext.diffusion import Diffusion
from nulltext.methods import NullTextInversion, image_seed
from nulltext.methods.null_text import PRECISIONS
from nulltext.metrics import psnr_per_image
from nulltext.models import pipeline_resolution, resolve_device
from nulltext.provenance import provenance
from nulltext.reconstruction import reconstruct
from nulltext.scenes import ScenesDataset

TOLERANCE_DB = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pocket", help="model config name or folder (pocket)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma separated; float32 is always run first")
    p.add_argument("--scenes", type=int, default=8, help="held-out procedural scenes (0: none)")
    p.add_argument("--photos", type=int, default=9, help="offline sample photos (0: none)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--inner-steps", type=int, default=10, help="N")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.precisions = ["float32"] + [x for x in args.precisions.split(",") if x.strip() and x.strip() != "float32"]
    unknown = set(args.precisions) - set(PRECISIONS)
    if unknown:
        p.error(f"--precisions: unknown {sorted(unknown)}; choose from {PRECISIONS}")
    return args


def images_and_captions(resolution: int, args) -> tuple[list[str], torch.Tensor, list[str]]:
    datasets = []
    if args.photos:
        datasets.append(SampleImages(resolution, limit=args.photos))
    if args.scenes:
        datasets.append(ScenesDataset(resolution, num_images=args.scenes, seed=args.seed))
    items = [d[i] for d in datasets for i in range(len(d))]
    return [x["id"] for x in items], torch.stack([x["image"] for x in items]), [x["caption"] for x in items]


def run(diffusion: Diffusion, precision: str, ids, images, captions, args) -> dict:
    method = NullTextInversion(num_inner_steps=args.inner_steps, precision=precision)
    psnrs, seconds, iterations = [], 0.0, []
    for start in range(0, len(ids), args.batch):
        sl = slice(start, start + args.batch)
        z0 = diffusion.encode_images(images[sl])
        began = time.perf_counter()
        inversion = method.invert(diffusion, z0, captions[sl], [image_seed(args.seed, i) for i in ids[sl]])
        if z0.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - began
        recon = reconstruct(diffusion, inversion).images.cpu()
        psnrs += psnr_per_image(recon.float() / 255, images[sl].float() / 255).tolist()
        iterations += inversion.iterations
    return {"psnr": psnrs, "seconds_per_image": seconds / len(ids), "iterations_mean": sum(iterations) / len(iterations)}


def report(results: dict, ids: list[str], env: dict, args) -> str:
    base = results["float32"]["psnr"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = [
        "| precision | mean PSNR (dB) | vs float32 (dB) | largest per-image difference (dB) | s/image | iterations/image | within 0.1 dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        diffs = [a - b for a, b in zip(r["psnr"], base)]
        delta = mean(r["psnr"]) - mean(base)
        r["delta_db"], r["max_abs_image_delta_db"] = delta, max(abs(d) for d in diffs)
        untestable = name == "tf32" and env["device_name"] == "CPU"  # TF32 exists on CUDA only: equals float32 here
        r["within_tolerance"] = None if untestable else abs(delta) <= TOLERANCE_DB
        if name == "float32":
            verdict = "reference"
        elif untestable:
            verdict = "not tested (no TF32 on a CPU)"
        else:
            verdict = "yes" if r["within_tolerance"] else "**no**"
        lines.append(
            f"| {name} | {mean(r['psnr']):.3f} | {delta:+.3f} | {r['max_abs_image_delta_db']:.3f} | "
            f"{r['seconds_per_image']:.2f} | {r['iterations_mean']:.0f} | {verdict} |"
        )
    header = [
        f"### Reduced precision vs float32: `{args.model}` on {env['device_name']}",
        "",
        f"- {len(ids)} images ({args.photos} sample photos, {args.scenes} held-out scenes), null-text N = "
        f"{args.inner_steps}, DDIM {args.steps} steps, guidance 7.5, batch {args.batch}; reconstructions in float32",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, nulltext commit `{env['git_commit']}`"
        + (" (with local changes)" if env["git_dirty"] else ""),
        "",
    ]
    return "\n".join(header + lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model).to(device)
    diffusion = Diffusion(pipe, num_inference_steps=args.steps)
    ids, images, captions = images_and_captions(pipeline_resolution(pipe), args)
    results = {}
    for precision in args.precisions:
        results[precision] = run(diffusion, precision, ids, images, captions, args)
        print(f"[precision_check] {precision}: {sum(results[precision]['psnr']) / len(ids):.3f} dB", file=sys.stderr, flush=True)
    prov = provenance()
    env = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "diffusers": prov["versions"].get("diffusers"),
        "git_commit": prov["git"]["commit"],
        "git_dirty": prov["git"]["dirty"],
    }
    text = report(results, ids, env, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "ids": ids, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
