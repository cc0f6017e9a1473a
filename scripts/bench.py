#!/usr/bin/env python
"""Speed and memory of null-text inversion: the reference engine vs the fast engine, in ONE process.

Times, on one device and in one go (warm-up first):

- ``null_text_reference`` (:class:`nulltext.methods.OfficialNullTextInversion`): the official loop
  as written (one image at a time, weights not frozen, explicit attention): the baseline;
- ``null_text`` (:class:`nulltext.methods.NullTextInversion`): the fast, batched engine, at every
  batch size of ``--batch-sizes`` (plus any ``--variant`` of its constructor options);
- ``negative_prompt`` (:class:`nulltext.methods.NegativePromptInversion`): no optimisation;
- ``flow_inversion`` (:class:`nulltext.methods.FlowInversion`): reverse Euler, for the flow families (SD3, FLUX),
  and the flow inversions ``rf_inversion``, ``rf_solver``, ``fireflow``, ``uniinv`` (docs/flow_methods.md);

with early stopping off (``early_stop_epsilon=-1``: every step takes N iterations) and on (the
official threshold), and reports seconds per image, images per minute, peak GPU memory and the
ratios against the reference of the same early-stop setting. It also checks that the fast engine's
first image equals the reference's (relative error of the embeddings, z_T and the reconstruction
latents): speed counts only at an equal float32 result.

Every model family runs (``--model tiny_xl``, ``sdxl_random``, ``tiny_sd3``, ``flux_random``, ...): by
default the engines whose method runs on the model's family (``nulltext.methods.check_family``), at
the model's resolution and with its sampler's settings (conf/diffusion, unless ``--steps`` /
``--guidance-scale`` say otherwise). The reference runs on SD only; without it the report says why
and has no ratios.

Writes the markdown report to stdout and to ``--out``, full logs to ``--log``, raw numbers to
``--json``. The report is rewritten after every run, so a run cut short still leaves its rows.

Examples::

    # GPU (one H100, random-init SD1.4-shaped model at 512 px; see docs/benchmarks.md)
    python scripts/bench.py --model sd14_random --steps 10 --batch-sizes 1,2,4,8,16 --out $OUT/bench.md
    # CPU smoke run (seconds)
    python scripts/bench.py --model tiny --steps 4 --batch-sizes 1,2
    # SDXL and FLUX on the CPU (smoke; issue 19's GPU rows: docs/benchmarks.md)
    python scripts/bench.py --model tiny_xl --steps 2 --batch-sizes 1 --early-stop off
    python scripts/bench.py --model tiny_flux --steps 2 --batch-sizes 1
    # the null-text memory options (UNet gradient checkpointing, bf16 UNet weights) on SDXL
    python scripts/bench.py --model tiny_xl --steps 2 --batch-sizes 1 --early-stop off --engines fast \
        --model-dtype bf16 --variant ckpt:gradient_checkpointing=true
    # the default offline experiment (`nulltext -m inversion=vae,ddim,negative_prompt,null_text
    # data.limit=4`) timed in-process on the CPU
    python scripts/bench.py --cpu-default
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing (PYTHONPATH=src)

import torch
import yaml

log = logging.getLogger("bench")

CAPTIONS = [  # used when the offline sample photos are not installed (synthetic images)
    "a photo of a red ball on a table",
    "a dog running on the beach",
    "a bowl of fruit on a wooden table",
    "a city street at night",
]
GiB = 2**30
# --engines name -> the inversion method class it times (imported lazily: nulltext.methods loads diffusers).
ENGINES = {"reference": "OfficialNullTextInversion", "fast": "NullTextInversion", "negative_prompt": "NegativePromptInversion",
           "flow_inversion": "FlowInversion", "rf_inversion": "RFInversion", "rf_solver": "RFSolverInversion",
           "fireflow": "FireFlowInversion", "uniinv": "UniInversion"}
# The engines with no optimisation (no early stop, no reference to compare with): timed once per batch size.
ONE_PASS = ("negative_prompt", "flow_inversion", "rf_inversion", "rf_solver", "fireflow", "uniinv")


# -- setup ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd14_random", help="a conf/model config name (sd14_random; tiny for a CPU smoke run)")
    p.add_argument("--model-dtype", default="float32", choices=("float32", "bf16", "fp16"),
                   help="the UNet's weights (model.dtype; embeddings, Adam and latents stay float32). With "
                        "--variant ckpt:gradient_checkpointing=true, the memory options of the null-text inner loop")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--steps", type=int, default=None, help="sampler steps S (default: the model's sampler config, "
                   "50 DDIM steps for SD and SDXL, 28 flow steps for SD3 and FLUX; fewer for a shortened run: "
                   "every cost is linear in S, so the ratios do not change)")
    p.add_argument("--inner-steps", type=int, default=10, help="N, Adam steps per timestep (10)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's sampler config "
                   "(7.5 for SD and SDXL, 7.0 for SD3, FLUX's guidance input 3.5)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="fast-engine batch sizes, comma separated")
    p.add_argument("--early-stop", default="off,on", help="off: early_stop_epsilon=-1 (N iterations every step); "
                   "on: the official 1e-5 + 2e-5 i. Comma separated, in the order run")
    p.add_argument("--engines", default=None, help=f"which engines to time, of {', '.join(ENGINES)} (default: "
                   "those whose method runs on the model's family)")
    p.add_argument("--reference-images", type=int, default=1, help="images the reference is timed on (it runs "
                   "them one by one, so batch size cannot matter)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                   help="also time the fast engine with these NullTextInversion options (values in YAML), "
                   "e.g. 'compiled:compile=true'; repeatable")
    p.add_argument("--repeats", type=int, default=1, help="time every run this many times and keep the fastest "
                   "(1 on a GPU, where a run is long; more on a noisy shared CPU)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the fast engine's result with the reference's")
    p.add_argument("--warmup-steps", type=int, default=2, help="DDIM steps of the warm-up runs (0: no warm-up)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: skip the runs that would start later")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on a CPU device, where "
                   "the tiny model's calls are too small to share; torch's default otherwise); 0 = torch's default")
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here too")
    p.add_argument("--log", type=Path, default=None, help="full log (default: --out with .log, else outputs/bench/<time>.log)")
    p.add_argument("--json", type=Path, default=None, help="raw results as JSON (default: --out with .json)")
    p.add_argument("--profile", type=int, default=None, metavar="BATCH", help="after the timed runs, profile one "
                   "fast-engine run at this batch size (--profile-steps DDIM steps, early stopping off): where the time "
                   "goes, and how busy the device is; table in the report, Chrome trace beside --out")
    p.add_argument("--profile-steps", type=int, default=2, help="DDIM steps of the profiled run (2)")
    p.add_argument("--profile-variant", default=None, help="profile this --variant LABEL instead of the plain engine")
    p.add_argument("--cpu-default", action="store_true", help="time the default offline experiment on the CPU instead "
                   "(the default model, inversion=vae,ddim,negative_prompt,null_text data.limit=4, through nulltext.cli.run_inversion)")
    p.add_argument("--limit", type=int, default=4, help="--cpu-default: data.limit (4)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.early_stop = [e.strip() for e in args.early_stop.split(",") if e.strip()]
    args.engines_given = args.engines is not None
    args.engines = [e.strip() for e in (args.engines or ",".join(ENGINES)).split(",") if e.strip()]
    if set(args.early_stop) - {"off", "on"} or not args.early_stop:
        p.error("--early-stop takes off, on or off,on")
    if set(args.engines) - set(ENGINES):
        p.error(f"--engines takes {', '.join(ENGINES)}")
    if any(b < 1 for b in args.batch_sizes) or not args.batch_sizes:
        p.error("--batch-sizes must be positive integers")
    args.variants = [parse_variant(v, p) for v in args.variant]
    if args.profile_variant is not None and args.profile_variant not in {label for label, _ in args.variants}:
        p.error(f"--profile-variant {args.profile_variant!r} is not the label of a --variant")
    if args.log is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        args.log = args.out.with_suffix(".log") if args.out else ROOT / "outputs" / "bench" / f"{stamp}.log"  # git-ignored
    if args.json is None and args.out:
        args.json = args.out.with_suffix(".json")
    return args


def parse_variant(text: str, parser: argparse.ArgumentParser) -> tuple[str, dict]:
    label, _, options = text.partition(":")
    if not label or not options:
        parser.error(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
    kwargs = {}
    for item in options.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    return label, kwargs


def setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    file_handler = logging.FileHandler(path, mode="w")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[bench] %(message)s"))
    console.setLevel(logging.INFO)
    console.addFilter(lambda record: record.name == "bench")  # the libraries' messages go to the log file only
    root.addHandler(file_handler)
    root.addHandler(console)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_threads(args, device: torch.device) -> None:
    if args.threads == 0:
        return
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


def precision_settings() -> dict:
    """The float32 precision switches in force (read defensively: torch forbids mixing its two APIs)."""
    found = {}
    for name, getter in (
        ("float32_matmul_precision", torch.get_float32_matmul_precision),
        ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
        ("cudnn.conv.fp32_precision", lambda: torch.backends.cudnn.conv.fp32_precision),
        ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
        ("cudnn.benchmark", lambda: torch.backends.cudnn.benchmark),
    ):
        try:
            found[name] = getter()
        except Exception as error:  # noqa: BLE001 - informational only
            found[name] = f"unreadable ({type(error).__name__})"
    return found


def environment(device: torch.device) -> dict:
    from nulltext.provenance import provenance

    prov = provenance()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "card": card,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": prov["versions"].get("diffusers"),
        "transformers": prov["versions"].get("transformers"),
        "python": prov["versions"].get("python"),
        # A copy of the tree without .git (the GPU machine) has no commit: NULLTEXT_GIT_COMMIT names it.
        "git_commit": prov["git"].get("commit") or os.environ.get("NULLTEXT_GIT_COMMIT", "unknown"),
        "git_dirty": prov["git"].get("dirty"),
        "precision": precision_settings(),
    }


def build_pipeline(model: str, dtype: str = "float32"):
    """The model config's pipeline (its UNet's weights in ``dtype``) and its sampler settings (the diffusion config the model picks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", *([f"model.dtype={dtype}"] if dtype != "float32" else [])])
        pipe = instantiate(cfg.model)
    GlobalHydra.instance().clear()
    sampler = OmegaConf.to_container(cfg.diffusion)
    sampler.pop("_target_")
    return pipe, sampler


def bench_images(n: int, resolution: int) -> tuple[torch.Tensor, list[str], str]:
    """n uint8 images [n,3,R,R] and captions: the offline sample photos (cycled), else synthetic ones."""
    try:
        from nulltext.data import SampleImages

        dataset = SampleImages(resolution=resolution)
        items = [item for item in (dataset[i] for i in range(len(dataset))) if "image" in item and item.get("caption")]
    except Exception as error:  # noqa: BLE001 - a missing photo package falls back to synthetic images
        log.warning("sample photos unavailable (%s); using synthetic images", error)
        items = []
    if items:
        chosen = [items[i % len(items)] for i in range(n)]
        return torch.stack([c["image"] for c in chosen]), [c["caption"] for c in chosen], f"sample photos ({len(items)} distinct, cycled)"
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bicubic", align_corners=False)
    images = (images.clamp(0, 1) * 255).to(torch.uint8)
    return images, [CAPTIONS[i % len(CAPTIONS)] for i in range(n)], "synthetic smooth images"


# -- timing --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_invert(method, diffusion, z0, prompts, device):
    """(inversion, seconds, peak bytes or None) for one call of ``method.invert``."""
    clean(device)
    sync(device)
    start = time.perf_counter()
    with torch.enable_grad():
        inversion = method.invert(diffusion, z0, prompts, list(range(len(prompts))))
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return inversion, seconds, peak


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def equality(diffusion, fast, ref) -> dict:
    """Relative errors of the fast engine's image 0 against the reference's image 0."""
    with torch.no_grad():
        f, r = fast.select(0), ref.select(0)
        rec_f = diffusion.sample(f.z_T, f.uncond, f.cond)[:, -1]
        rec_r = diffusion.sample(r.z_T, r.uncond, r.cond)[:, -1]
    return {
        "uncond_rel": rel(f.uncond, r.uncond),
        "uncond_max": (f.uncond - r.uncond).abs().max().item(),
        "z_T_rel": rel(f.z_T, r.z_T),
        "recon_rel": rel(rec_f, rec_r),
        "iterations_equal": f.iterations == r.iterations,
    }


def fmt(value, spec=".2f", none="n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


class Report:
    """Collects rows and rewrites the markdown/JSON outputs after each one."""

    def __init__(self, args, env: dict, setup: dict):
        self.args, self.env, self.setup = args, env, setup
        self.rows: list[dict] = []
        self.profile: dict | None = None
        self.started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        log.debug("row: %s", json.dumps(row))
        if row.get("status") == "ok":
            peak = f", peak {row['peak_bytes'] / GiB:.2f} GiB" if row.get("peak_bytes") else ""
            check = f", emb. rel. err. vs ref {row['check']['uncond_rel']:.1e}" if row.get("check") else ""
            log.info("  %.3f s/image (%d images, %.1f s)%s%s", row["seconds_per_image"], row["images"], row["seconds"], peak, check)
        else:
            log.info("  %s", row["status"])
        self.write()

    def reference(self, early_stop: str) -> dict | None:
        return next((r for r in self.rows if r["engine"] == "null_text_reference" and r["early_stop"] == early_stop and r.get("seconds_per_image")), None)

    def ratios(self, row: dict) -> tuple[float | None, float | None, str | None]:
        if row["engine"] == "null_text_reference":
            return 1.0, (1.0 if row.get("peak_bytes") else None), row["early_stop"]
        if row["engine"] == "negative_prompt":  # against the official settings (early stopping on) if measured
            ref = self.reference("on") or self.reference("off")
        else:
            ref = self.reference(row["early_stop"])
        if ref is None or not row.get("seconds_per_image"):
            return None, None, None
        speed = ref["seconds_per_image"] / row["seconds_per_image"]
        memory = row["peak_bytes"] / ref["peak_bytes"] if row.get("peak_bytes") and ref.get("peak_bytes") else None
        return speed, memory, ref["early_stop"]

    def markdown(self) -> str:
        a, e, s = self.args, self.env, self.setup
        dirty = " (with local changes)" if e["git_dirty"] else ""
        lines = [
            f"### {s['title']}",
            "",
            f"- card: **{e['card']}**; torch {e['torch']} (CUDA {e['cuda']}), diffusers {e['diffusers']}, "
            f"transformers {e['transformers']}, Python {e['python']}; nulltext commit `{e['git_commit']}`{dirty}; "
            f"{e['threads']} CPU threads; {self.started}",
            f"- model `{a.model}` ({s['unet_params'] / 1e6:.1f} M {s['denoiser']} parameters, {s['weights_dtype']} weights), {s['resolution']} px, latents "
            f"{s['latent_shape']}; {s['sampler']} S = {s['steps']} steps, N = {a.inner_steps} inner steps, guidance {s['guidance']}; "
            f"images: {s['images']}; weights on the device: "
            + (f"{s['weights_bytes'] / GiB:.2f} GiB" if s["weights_bytes"] else "n/a"),
            f"- float32 precision settings: {', '.join(f'{k}={v}' for k, v in e['precision'].items())}",
            f"- command: `{s['command']}`",
            *[f"- not timed: {engine} ({reason})" for engine, reason in s["skipped"].items()],
            "",
            "| engine | early stop | batch | images | s/image | images/min | peak GiB | speed vs ref | memory vs ref "
            "| iters/image | result vs ref (emb. / recon. rel. err.) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            if row.get("status") != "ok":
                lines.append(f"| {row['engine']} | {row['early_stop']} | {row['batch']} | {row['images']} | "
                             f"{row['status']} | | | | | | |")
                continue
            speed, memory, _ = self.ratios(row)
            check = row.get("check")
            check_text = "reference" if row["engine"] == "null_text_reference" else (
                f"{check['uncond_rel']:.1e} / {check['recon_rel']:.1e}" if check else "n/a")
            lines.append(
                f"| {row['engine']} | {row['early_stop']} | {row['batch']} | {row['images']} | "
                f"{row['seconds_per_image']:.3f} | {60 / row['seconds_per_image']:.2f} | "
                f"{fmt(row['peak_bytes'] and row['peak_bytes'] / GiB)} | {fmt(speed, '.2f')}{'x' if speed is not None else ''} | "
                f"{fmt(memory, '.2f')}{'x' if memory is not None else ''} | {fmt(row['iterations_mean'], '.0f')} | {check_text} |"
            )
        ratios = ("Ratios: speed = reference s/image / this s/image (images/min ratio); memory = this peak / "
                  "reference peak; each against the reference with the same early-stop setting (negative_prompt: "
                  "against the reference with early stopping on, the official default, if measured). ")
        if "null_text_reference" in self.setup["skipped"]:
            ratios = "No reference row, so no ratios (n/a). "
        lines += ["", ratios + "Peak = torch.cuda.max_memory_allocated, weights included, reset before each run.", ""]
        lines += self.goals()
        if self.profile:
            p = self.profile
            busy = p["device_busy_fraction"]
            lines += ["", f"#### Profile: null_text ({p['variant']}), batch {p['batch']}, {p['steps']} DDIM steps, "
                      f"early stopping off, {p['seconds']:.2f} s under the profiler", ""]
            if busy is not None:
                lines.append(f"Device busy (sum of kernel time / wall time): {100 * busy:.0f}%.")
            lines += ["", "```", p["table"].rstrip(), "```"]
        return "\n".join(lines) + "\n"

    def goals(self) -> list[str]:
        family = self.setup["family"]
        if family == "sdxl":  # issue 19's goal for SDXL: null-text inversion at 1024 px under 24 GB
            row = next((r for r in self.rows if r["engine"] == "null_text" and r["batch"] == 1 and r.get("status") == "ok"), None)
            peak = row and row.get("peak_bytes")
            result = (f"{peak / 1e9:.2f} GB ({peak / GiB:.2f} GiB) -> {'met' if peak < 24e9 else 'not met'}" if peak
                      else "n/a" + (" (CPU)" if self.env["card"] == "CPU" else ""))
            return ["Goals (computed from this table):", "", f"- SDXL null-text peak memory < 24 GB at batch 1: {result}"]
        if family != "sd":
            return [f"Goals: none set for {family} models (issue 19 sets memory goals for SDXL and SD 1.4 only)."]
        # Every fast-engine row counts (the plain engine and its --variant rows); the speed goal
        # takes the fastest one whose result equals the reference's.
        fast = [r for r in self.rows if r["engine"].startswith("null_text") and r["engine"] != "null_text_reference"
                and r.get("status") == "ok"]
        off = [r for r in fast if r["early_stop"] == "off"]
        lines = ["Goals (computed from this table):", ""]
        if self.env["card"] == "CPU":
            lines = ["Goals (computed from this table; a CPU smoke run is NOT evidence for them: they are about "
                     "the SD1.4-sized model on a GPU):", ""]
        def equal(row: dict) -> bool:
            check = row.get("check")
            return check is not None and check["uncond_rel"] < 1e-3 and check["recon_rel"] < 1e-3

        best = max(off, key=lambda r: (equal(r), self.ratios(r)[0] or 0), default=None)
        if best and self.ratios(best)[0] is not None:
            speed, check = self.ratios(best)[0], best.get("check")
            lines.append(f"- fast engine >= 8x reference images/min, early stopping off, equal float32 result: "
                         f"{speed:.2f}x ({best['engine']}, batch {best['batch']}), result "
                         f"{'equal (rel. err. < 1e-3)' if equal(best) else ('NOT checked' if check is None else 'DIFFERENT')}"
                         f" -> {'met' if speed >= 8 and equal(best) else 'not met'}")
        else:
            lines.append("- fast engine >= 8x reference images/min: not measured")
        for batch, limit in ((1, 6), (8, 24)):
            row = next((r for r in off if r["batch"] == batch and r["engine"] == "null_text"), None)
            if row is None or row.get("peak_bytes") is None:
                lines.append(f"- peak memory <= {limit} GB at batch {batch}: n/a" + (" (CPU)" if self.env["card"] == "CPU" else ""))
            else:
                peak = row["peak_bytes"]
                lines.append(f"- peak memory <= {limit} GB at batch {batch}: {peak / 1e9:.2f} GB ({peak / GiB:.2f} GiB) "
                             f"-> {'met' if peak <= limit * 1e9 else 'not met'}")
        npi = min((r for r in self.rows if r["engine"] == "negative_prompt" and r.get("status") == "ok"),
                  key=lambda r: r["batch"], default=None)
        if npi and self.ratios(npi)[0] is not None:
            speed, _, ref_es = self.ratios(npi)
            lines.append(f"- negative-prompt >= 20x faster than reference null-text (batch {npi['batch']}, reference "
                         f"early stop {ref_es}): {speed:.1f}x -> {'met' if speed >= 20 else 'not met'}")
        else:
            lines.append("- negative-prompt >= 20x faster than reference null-text: not measured")
        return lines

    def write(self) -> None:
        text = self.markdown()
        if self.args.out:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.write_text(text)
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps({"environment": self.env, "setup": self.setup, "rows": self.rows,
                                                  "profile": self.profile}, indent=2, default=str))


def run_bench(args) -> str:
    from nulltext import methods
    from nulltext.diffusion import Diffusion
    from nulltext.methods import NullTextInversion, OfficialNullTextInversion
    from nulltext.models import resolve_device

    device = resolve_device(args.device)
    set_threads(args, device)
    t_start = time.perf_counter()
    log.info("building model %s ...", args.model)
    pipe, sampler = build_pipeline(args.model, args.model_dtype)
    pipe.to(device)
    log.info("model built and moved to %s in %.1f s", device, time.perf_counter() - t_start)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    steps = args.steps or sampler["num_inference_steps"]
    guidance = sampler["guidance_scale"] if args.guidance_scale is None else args.guidance_scale

    def make_diffusion(num_steps: int) -> Diffusion:
        return Diffusion(pipe, num_inference_steps=num_steps, guidance_scale=guidance, inversion_timestep=sampler["inversion_timestep"])

    diffusion = make_diffusion(steps)
    family = diffusion.family.name
    resolution = diffusion.resolution
    # The engines whose method runs on this family; the reference, the baseline of every ratio, is
    # named with the reason whenever it cannot run (other engines only when asked for by --engines).
    skipped = {}
    for engine in list(args.engines):
        method = getattr(methods, ENGINES[engine])
        if family not in method.families:
            args.engines.remove(engine)
            if args.engines_given or engine == "reference":
                skipped[method.name] = f"inversion={method.name} runs on {', '.join(method.families)} models only; this model is {family}"
    if (args.variants or args.profile) and family not in NullTextInversion.families:
        raise SystemExit(f"bench: error: --variant and --profile time null-text, which does not run on {family} models")
    n_images = max([*args.batch_sizes, args.reference_images])
    images, captions, source = bench_images(n_images, resolution)
    with torch.no_grad():
        z0 = torch.cat([diffusion.encode_images(images[i : i + 4].to(device)) for i in range(0, n_images, 4)])
    env = environment(device)
    setup = {
        "title": f"nulltext inversion benchmark on {env['card']}" + (" (CPU smoke run)" if device.type == "cpu" else ""),
        "family": family,
        "denoiser": "UNet" if diffusion.family.denoiser_name == "unet" else diffusion.family.denoiser_name,
        "unet_params": sum(p.numel() for p in diffusion.unet.parameters()),
        "weights_dtype": args.model_dtype,
        "sampler": "DDIM" if family in ("sd", "sdxl") else "flow Euler",
        "guidance": guidance,
        "skipped": skipped,
        "resolution": resolution,
        "latent_shape": "x".join(map(str, z0.shape[1:])),
        "steps": steps,
        "images": source,
        "weights_bytes": weights,
        "command": " ".join(["python", *sys.argv]),
        "device": str(device),
    }
    log.debug("environment: %s", json.dumps(env, indent=2, default=str))
    log.debug("setup: %s", json.dumps(setup, indent=2, default=str))
    log.debug("torch config:\n%s", torch.__config__.show())
    report = Report(args, env, setup)

    def settings(early_stop: str) -> dict:
        return {"num_inner_steps": args.inner_steps, **({"early_stop_epsilon": -1.0} if early_stop == "off" else {})}

    one_pass = {engine: getattr(methods, ENGINES[engine]) for engine in ONE_PASS if engine in args.engines}
    fast_engines = [("null_text", {})] if "fast" in args.engines else []
    fast_engines += [(f"null_text[{label}]", kwargs) for label, kwargs in args.variants]

    # Warm-up: every engine and batch size once on a few steps (CUDA context, kernels, allocator).
    if args.warmup_steps > 0:
        t0 = time.perf_counter()
        warm = make_diffusion(args.warmup_steps)
        warm_settings = {"num_inner_steps": 2, "early_stop_epsilon": -1.0}
        try:
            if "reference" in args.engines:
                timed_invert(OfficialNullTextInversion(**warm_settings), warm, z0[:1], captions[:1], device)
            for _, kwargs in fast_engines:
                for b in args.batch_sizes:
                    timed_invert(NullTextInversion(**{**warm_settings, **kwargs}), warm, z0[:b], captions[:b], device)
            for engine in one_pass:
                timed_invert(one_pass[engine](), warm, z0[:1], captions[:1], device)
        except torch.OutOfMemoryError as error:
            log.warning("warm-up ran out of memory (%s); the timed runs will report it", str(error).splitlines()[0])
        log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    def over_budget(engine: str, batch: int) -> bool:
        """Past the budget, or would be by the end of this run (predicted from this engine's last run)."""
        if args.time_budget is None:
            return False
        done = [r for r in report.rows if r["engine"] == engine and r.get("status") == "ok"]
        predicted = done[-1]["seconds_per_image"] * batch * max(1, args.repeats) if done else 0.0
        return time.perf_counter() - t_start + predicted > args.time_budget

    def run(engine: str, early_stop: str, method, batch: int, reference=None, label=None) -> object:
        row = {"engine": engine, "early_stop": early_stop, "batch": label or batch, "images": batch}
        if over_budget(engine, batch):
            report.add({**row, "status": "skipped (time budget)"})
            return None
        log.info("timing %s, early stop %s, batch %d ...", engine, early_stop, batch)
        try:
            timings = [timed_invert(method, diffusion, z0[:batch], captions[:batch], device) for _ in range(max(1, args.repeats))]
            inversion, seconds, peak = min(timings, key=lambda x: x[1])
            peak = max((t[2] for t in timings), default=None) if peak is not None else None
            del timings
        except torch.OutOfMemoryError as error:
            log.warning("%s batch %d: out of memory: %s", engine, batch, str(error).splitlines()[0])
            clean(device)
            report.add({**row, "status": "OOM"})
            return None
        row.update(status="ok", seconds=seconds, repeats=max(1, args.repeats), seconds_per_image=seconds / batch, peak_bytes=peak,
                   iterations=inversion.iterations, iterations_mean=sum(inversion.iterations) / batch)
        if reference is not None and not args.no_check:
            row["check"] = equality(diffusion, inversion, reference)
        report.add(row)
        return inversion

    for n, early_stop in enumerate(args.early_stop):
        reference = None
        if "reference" in args.engines:
            reference = run("null_text_reference", early_stop, OfficialNullTextInversion(**settings(early_stop)),
                            args.reference_images, label="1 (loop)")
        for engine, kwargs in fast_engines:
            for b in args.batch_sizes:
                run(engine, early_stop, NullTextInversion(**{**settings(early_stop), **kwargs}), b, reference)
        if n == 0:  # cheap (negative-prompt's speed is a goal): before the second early-stop pass
            for engine, cls in one_pass.items():
                for b in args.batch_sizes:
                    run(engine, "n/a", cls(), b)
    if args.profile:
        kwargs = dict(args.variants).get(args.profile_variant, {})
        method = NullTextInversion(num_inner_steps=args.inner_steps, early_stop_epsilon=-1.0, **kwargs)
        short = make_diffusion(args.profile_steps)
        picks = [i % n_images for i in range(args.profile)]
        z_profile, captions_profile = z0[picks], [captions[i] for i in picks]
        timed_invert(method, short, z_profile, captions_profile, device)  # warm
        report.profile = profile_run(method, short, z_profile, captions_profile, device, args)
        report.write()
    log.info("benchmark done in %.1f s", time.perf_counter() - t_start)
    return report.markdown()


def profile_run(method, diffusion, z0, captions, device, args) -> dict:
    """One run under torch.profiler: the top operators by self time on the device (CPU: host), and the
    fraction of the wall time the device spent in kernels (well below 1: launch overhead / host waits)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _, seconds, _ = timed_invert(method, diffusion, z0, captions, device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / 1e6 if device.type == "cuda" else None
    result = {
        "variant": args.profile_variant or "plain",
        "batch": z0.shape[0],
        "steps": diffusion.schedule.num_steps,
        "seconds": seconds,
        "device_busy_fraction": busy / seconds if busy is not None else None,
        "table": events.table(sort_by=key, row_limit=20),
    }
    if args.out:
        trace = args.out.with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace))
        result["trace"] = str(trace)
    log.info("profile:\n%s", result["table"])
    return result


# -- the default offline experiment on the CPU -----------------------------------------------
def run_cpu_default(args) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from nulltext.cli import run_inversion

    device = torch.device("cpu")
    set_threads(args, device)
    env = environment(device)
    methods = ["vae", "ddim", "negative_prompt", "null_text"]
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory(prefix="nulltext-bench-") as tmp:
        for method in methods:
            overrides = [f"inversion={method}", f"data.limit={args.limit}", "trainer=cpu"]
            if args.steps:
                overrides.append(f"diffusion.num_inference_steps={args.steps}")
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)
                with open_dict(cfg):
                    cfg.paths.output_dir = str(Path(tmp) / method)
                    del cfg.hydra
                log.info("running %s ...", " ".join(overrides))
                captured = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(captured):
                    metrics = run_inversion(cfg)
                seconds = time.perf_counter() - start
            GlobalHydra.instance().clear()
            log.debug("%s output:\n%s", method, captured.getvalue())
            total += seconds
            rows.append({"method": method, "wall_seconds": seconds, "seconds_per_image": metrics.get("seconds_mean"),
                         "psnr": metrics.get("psnr_mean"), "images": metrics.get("num_images"),
                         "iterations": metrics.get("iterations_mean")})
            log.info("%s", json.dumps(rows[-1]))
    dirty = " (with local changes)" if env["git_dirty"] else ""
    lines = [
        "### The default offline experiment on the CPU",
        "",
        f"- `nulltext -m inversion=vae,ddim,negative_prompt,null_text data.limit={args.limit}`"
        + (f" diffusion.num_inference_steps={args.steps}" if args.steps else "")
        + " equivalent, in one process through `nulltext.cli.run_inversion` (the default model, trainer=cpu)",
        f"- CPU {env['cpu']}, {env['threads']} torch threads, {os.cpu_count()} cores visible; torch {env['torch']}, "
        f"diffusers {env['diffusers']}; nulltext commit `{env['git_commit']}`{dirty}",
        "",
        "| method | images | wall s (whole job) | inversion s/image | iters/image | PSNR |",
        "|---|---|---|---|---|---|",
        *[f"| {r['method']} | {r['images']} | {r['wall_seconds']:.1f} | {fmt(r['seconds_per_image'], '.3f')} | "
          f"{fmt(r['iterations'], '.0f')} | {fmt(r['psnr'], '.2f')} |" for r in rows],
        f"| **total** | | **{total:.1f}** | | | |",
        "",
        "Wall seconds include building the model, LPIPS, reconstruction and writing the outputs.",
    ]
    text = "\n".join(lines) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows, "total_seconds": total}, indent=2, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log)
    log.info("log: %s", args.log)
    text = run_cpu_default(args) if args.cpu_default else run_bench(args)
    print(text)
    if args.out:
        log.info("report written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
