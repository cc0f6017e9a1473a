"""Evaluation of the pocket model: text control, autoencoder quality, the null-text ablation ordering
and attention localisation (``scripts/evaluate_pocket_model.py`` runs :func:`main`).

:func:`main` writes ``DIR/pocket_eval.json`` and ``DIR/pocket_eval.md`` and prints the markdown::

    python scripts/evaluate_pocket_model.py                         # models/pocket, defaults
    python scripts/evaluate_pocket_model.py --model PATH --out DIR --text-images 48 --inv-images 4

Four parts, all with nulltext's own classes (Diffusion, the inversion methods, reconstruct, psnr_per_image):

(i)   text control on held-out colour-shape pairs (``ScenesDataset(split="heldout")``): DDIM
      samples at guidance 7.5 and 1 from seeded noise, read back by ``SceneChecker`` (colour,
      position, shape, size; per object, for the held-out object alone, and per image), next to
      the checker's score on the clean renders at the same resolution (its ceiling there);
(ii)  autoencoder PSNR, decode(encode(x)) (VAEReconstruction), on held-out scenes and on the
      offline photos at the model's resolution, against the trivial baseline: bicubic down to the
      latent size and back up (both quantised to uint8 the same way);
(iii) the paper's ablation ordering (ALGORITHM.md section 6) on a few held-out scenes: VAE bound,
      DDIM inversion sampled at 7.5 (and 1), per-step null-text (N=10), random pivot (N=10),
      global null-text (10 passes = the same 500 iterations); on photos null-text N=10 and N=20;
(iv)  editability: Prompt-to-Prompt needs a word's cross-attention to sit on its object. One
      object per scene (every colour once), null-text inverted and sampled back with an
      AttentionStore; the colour word's map (the finest cross-attention maps, averaged over steps,
      layers and heads) against the object's pixels: the share of the map's mass on the object,
      and that share over the object's share of the image (1 = no localisation).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nulltext.data import SampleImages
from nulltext.diffusion import Diffusion
from nulltext.methods import (
    DDIMInversion,
    GlobalNullTextInversion,
    NullTextInversion,
    RandomPivotNullText,
    VAEReconstruction,
    image_seed,
)
from nulltext.metrics import psnr_per_image
from nulltext.models import load_pipeline, pipeline_resolution, pocket_path, resolve_device
from nulltext.reconstruction import reconstruct, to_uint8
from nulltext.editing import AttentionStore, edit
from nulltext.editing.tokens import word_positions
from nulltext.scenes import (
    BACKGROUND_COLOURS,
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneChecker,
    SceneObject,
    ScenesDataset,
    layout_from_scenes,
    render_layout,
)

ROOT = Path(__file__).resolve().parents[3]  # the repository holding this package (src layout)


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def load_batch(dataset, limit: int | None = None):
    ids, images, captions = [], [], []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        try:
            item = dataset[i]
        except Exception as error:  # a photo whose wheel is missing
            print(f"skipped item {i}: {error}", flush=True)
            continue
        ids.append(item["id"])
        images.append(item["image"])
        captions.append(item["caption"])
    return ids, torch.stack(images), captions


# ------------------------------------------------------------------------------------------------
# (i) text control
# ------------------------------------------------------------------------------------------------


def held_out_mask(scenes, width: int = 3) -> torch.Tensor:
    mask = torch.zeros(len(scenes), width, dtype=torch.bool)
    for b, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            mask[b, j] = obj.held_out
    return mask


def summarise_check(result, mask: torch.Tensor) -> dict:
    acc = result.accuracy()
    for name in ("colour", "position", "shape", "size"):
        ok = getattr(result, f"object_{name}_ok") & mask
        acc[f"heldout_object_{name}"] = float(ok.sum()) / max(1, int(mask.sum()))
    return acc


@torch.no_grad()
def text_control(diffusion: Diffusion, resolution: int, n: int, seed: int, batch: int, scales: list[float]) -> dict:
    data = ScenesDataset(resolution, num_images=n, seed=seed, split="heldout")
    _, clean, captions = load_batch(data)
    checker = SceneChecker(resolution=resolution)
    mask = held_out_mask(data.attributes)
    out = {"images": n, "resolution": resolution, "clean_renders": summarise_check(checker(clean, data.attributes), mask)}
    shape = (diffusion.unet.config.in_channels, diffusion.unet.config.sample_size, diffusion.unet.config.sample_size)
    null = diffusion.encode_text([""])
    for w in scales:
        images = []
        for start in range(0, n, batch):
            caps = captions[start : start + batch]
            # Drawn on the CPU whatever the device: the same starting noise on a GPU as here.
            z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + start + k)) for k in range(len(caps))])
            cond = diffusion.encode_text(caps)
            traj = diffusion.sample(z.to(diffusion.device), null.expand_as(cond).unsqueeze(1), cond.unsqueeze(1), w)
            images.append(to_uint8(diffusion.decode(traj[:, -1])).cpu())
        images = torch.cat(images)
        out[f"guidance_{w:g}"] = summarise_check(checker(images, data.attributes), mask)
        out.setdefault("_samples", {})[f"{w:g}"] = images[:16]
    return out


# ------------------------------------------------------------------------------------------------
# (ii) autoencoder
# ------------------------------------------------------------------------------------------------


def down_up(images: torch.Tensor, size: int) -> torch.Tensor:
    """The trivial baseline: bicubic to ``size`` (antialiased) and back; uint8 by truncation like reconstruct."""
    x = images.float() / 255
    small = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    back = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return to_uint8(back)


@torch.no_grad()
def autoencoder(diffusion: Diffusion, images: torch.Tensor, ids: list[str], batch: int = 32) -> dict:
    latent = diffusion.unet.config.sample_size
    vae_psnr, base_psnr = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        z0 = diffusion.encode_images(x)
        rec = reconstruct(diffusion, VAEReconstruction().invert(diffusion, z0, [""] * len(x), [0] * len(x))).images
        vae_psnr += psnr_per_image(rec.float() / 255, x.float() / 255).tolist()
        base_psnr += psnr_per_image(down_up(x, latent).float() / 255, x.float() / 255).tolist()
    return {
        "images": len(images),
        "vae_psnr": mean(vae_psnr),
        "down_up_psnr": mean(base_psnr),
        "margin_db": mean(vae_psnr) - mean(base_psnr),
        "per_image": {i: {"vae": v, "down_up": b} for i, v, b in zip(ids, vae_psnr, base_psnr)},
    }


# ------------------------------------------------------------------------------------------------
# (iii) inversion ablation
# ------------------------------------------------------------------------------------------------


def run_method(diffusion: Diffusion, method, images, captions, ids, seed: int) -> dict:
    t0 = time.perf_counter()
    z0 = diffusion.encode_images(images)
    seeds = [image_seed(seed, i) for i in ids]
    inversion = method.invert(diffusion, z0, list(captions), seeds)
    rec = reconstruct(diffusion, inversion)
    target = images.float() / 255
    psnr = psnr_per_image(rec.images.float() / 255, target).tolist()
    out = {"psnr": mean(psnr), "per_image": dict(zip(ids, psnr)), "iterations": mean(inversion.iterations)}
    for w in inversion.extra_guidance_scales:
        extra = reconstruct(diffusion, inversion, guidance_scale=w)
        out[f"psnr_at_{w:g}"] = mean(psnr_per_image(extra.images.float() / 255, target).tolist())
    out["seconds"] = time.perf_counter() - t0
    print(f"  {method.name}: {out['psnr']:.2f} dB ({out['seconds']:.0f} s)", flush=True)
    return out


def ablation(diffusion: Diffusion, images, captions, ids, seed: int, methods: dict) -> dict:
    return {name: run_method(diffusion, m, images, captions, ids, seed) for name, m in methods.items()}


# ------------------------------------------------------------------------------------------------
# (iv) editability: attention localisation
# ------------------------------------------------------------------------------------------------


def single_object_scenes(n: int) -> list[Scene]:
    """n one-object scenes on plain backgrounds: colours in turn, shapes, positions and backgrounds cycling."""
    return [
        Scene((SceneObject(SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)], "large", POSITIONS[i % len(POSITIONS)]),),
              "plain", BACKGROUND_COLOURS[i % len(BACKGROUND_COLOURS)])
        for i in range(n)
    ]


def attention_localisation(diffusion: Diffusion, resolution: int, n: int, seed: int) -> dict:
    scenes = single_object_scenes(n)
    images = render_layout(layout_from_scenes(scenes, seed=seed, jitter=False), resolution)
    empty = render_layout(layout_from_scenes([Scene((), s.background, s.background_colour) for s in scenes], seed=seed, jitter=False), resolution)
    objects = (images.int() - empty.int()).abs().amax(1) > 0  # [n, R, R]
    captions = [s.caption for s in scenes]
    inversion = NullTextInversion(num_inner_steps=10).invert(
        diffusion, diffusion.encode_images(images), captions, [image_seed(seed, f"attention-{i}") for i in range(n)]
    )
    inside, area = [], []
    for b, scene in enumerate(scenes):
        store = AttentionStore()
        edit(diffusion, inversion.select(b), [], store)
        maps = store.aggregate(max(store.resolutions()))[0].cpu()  # [h, w, keys], the source row
        word = maps[..., word_positions(diffusion.tokenizer, captions[b], scene.objects[0].colour)].sum(-1)
        word = F.interpolate(word[None, None], size=(resolution, resolution), mode="nearest")[0, 0]
        inside.append(float(word[objects[b]].sum() / word.sum()))
        area.append(float(objects[b].float().mean()))
    ratios = [i / a for i, a in zip(inside, area)]
    return {"images": n, "map_side": int(maps.shape[0]), "inside": mean(inside), "area": mean(area), "ratio": mean(ratios), "per_image_ratio": ratios}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


# Targets of the GPU model (per-object rates at guidance 7.5; the attention ratio on one-object scenes).
TEXT_CONTROL_TARGETS = {"colour": 0.95, "position": 0.95, "shape": 0.75}
ATTENTION_RATIO_TARGET = 3.0


def checks(report: dict) -> dict[str, bool]:
    out = {}
    scn = report.get("inversion_scenes")
    if scn:
        vae, nti = scn["vae"]["psnr"], scn["null_text_N10"]["psnr"]
        out["scenes: ddim@7.5 < null-text N=10"] = scn["ddim"]["psnr"] < nti
        out["scenes: null-text N=10 within 1 dB of the VAE bound"] = vae - nti <= 1.0
        if "random_pivot_N10" in scn:
            out["scenes: random pivot < null-text N=10"] = scn["random_pivot_N10"]["psnr"] < nti
        if "global_10_passes" in scn:
            out["scenes: global null-text (10 passes) < null-text N=10"] = scn["global_10_passes"]["psnr"] < nti
    ph = report.get("inversion_photos")
    if ph:
        vae = ph["vae"]["psnr"]
        out["photos: ddim@7.5 < null-text N=10"] = ph["ddim"]["psnr"] < ph["null_text_N10"]["psnr"]
        if "null_text_N20" in ph:
            out["photos: null-text N=20 >= N=10"] = ph["null_text_N20"]["psnr"] >= ph["null_text_N10"]["psnr"]
            out["photos: null-text N=20 within 1 dB of the VAE bound"] = vae - ph["null_text_N20"]["psnr"] <= 1.0
    for key in ("autoencoder_scenes", "autoencoder_photos_heldout"):
        if key in report:
            out[f"{key}: VAE beats bicubic down-up by >= 2 dB"] = report[key]["margin_db"] >= 2.0
    # What the H200 autoencoder measured (models/pocket-vae-h200): a GPU model must keep it.
    for key, floor in (("autoencoder_scenes", 41.0), ("autoencoder_photos_heldout", 23.3)):
        if key in report:
            out[f"{key}: VAE PSNR >= {floor} dB"] = report[key]["vae_psnr"] >= floor
    tc = report.get("text_control")
    if tc and "guidance_7.5" in tc:
        high = tc["guidance_7.5"]
        for name, floor in TEXT_CONTROL_TARGETS.items():
            out[f"text control @7.5: {name} >= {floor:.0%}"] = high[f"object_{name}"] >= floor
            if "guidance_1" in tc:
                out[f"text control: {name} @7.5 > @1"] = high[f"object_{name}"] > tc["guidance_1"][f"object_{name}"]
    loc = report.get("attention_localisation")
    if loc:
        out[f"attention ratio >= {ATTENTION_RATIO_TARGET:g}"] = loc["ratio"] >= ATTENTION_RATIO_TARGET
    return out


def markdown(report: dict) -> str:
    f = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    pct = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"  # noqa: E731
    lines = [f"# pocket evaluation: `{report['model']}`", "", f"Resolution {report['resolution']} px, latents {report['latent_size']}x{report['latent_size']}, DDIM {report['steps']} steps, seed {report['seed']}, {report.get('device', 'cpu')}, {report['threads']} thread(s), {report['minutes']:.1f} min.", ""]
    tc = report.get("text_control")
    if tc:
        lines += [f"## (i) Text control on held-out pairs ({tc['images']} scenes, SceneChecker at {tc['resolution']} px)", "",
                  "| images | colour | position | shape | size | held-out object colour / position / shape | all checks (per image) |", "|---|---|---|---|---|---|---|"]
        for key, label in [("clean_renders", "clean renders (checker ceiling)"), *[(k, f"samples, guidance {k.split('_')[1]}") for k in tc if k.startswith("guidance_")]]:
            a = tc[key]
            lines.append(f"| {label} | {pct(a['object_colour'])} | {pct(a['object_position'])} | {pct(a['object_shape'])} | {pct(a['object_size'])} | "
                         f"{pct(a['heldout_object_colour'])} / {pct(a['heldout_object_position'])} / {pct(a['heldout_object_shape'])} | {pct(a['image_all'])} |")
        lines += ["", "Per-object rates over every object of the captions; the held-out column counts only the object of a held-out colour-shape pair.", ""]
    ae = [(k, report[k]) for k in ("autoencoder_scenes", "autoencoder_photos_heldout", "autoencoder_photos_all") if k in report]
    if ae:
        lines += ["## (ii) Autoencoder PSNR (dB) vs bicubic down to the latent size and back", "", "| data | images | VAE | down-up | margin |", "|---|---|---|---|---|"]
        for k, a in ae:
            lines.append(f"| {k.replace('autoencoder_', '')} | {a['images']} | {f(a['vae_psnr'])} | {f(a['down_up_psnr'])} | {f(a['margin_db'])} |")
        lines.append("")
    for key, title in (("inversion_scenes", "held-out scenes"), ("inversion_photos", "photos (hand-written captions)")):
        inv = report.get(key)
        if not inv:
            continue
        lines += [f"## (iii) Inversion ablation on {title} ({len(next(iter(inv.values()))['per_image'])} images, mean PSNR dB)", "", "| method | PSNR | iterations | seconds |", "|---|---|---|---|"]
        for name, r in inv.items():
            lines.append(f"| {name} | {f(r['psnr'])} | {r['iterations']:.0f} | {r['seconds']:.0f} |")
            if "psnr_at_1" in r:
                lines.append(f"| {name} sampled at guidance 1 | {f(r['psnr_at_1'])} | 0 | |")
        lines.append("")
    loc = report.get("attention_localisation")
    if loc:
        lines += [f"## (iv) Editability: the colour word's cross-attention on its object ({loc['images']} one-object scenes, {loc['map_side']}x{loc['map_side']} maps)", "",
                  "| share of the map on the object | object's share of the image | ratio (1 = not localised) |", "|---|---|---|",
                  f"| {pct(loc['inside'])} | {pct(loc['area'])} | {f(loc['ratio'])} |", ""]
    lines += ["## Targets", "", "| check | holds |", "|---|---|"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=pocket_path())
    p.add_argument("--out", default=None, help="folder for pocket_eval.json/.md (default: <model>/eval)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when present)")
    p.add_argument("--text-images", type=int, default=48, help="held-out scenes for text control (0: skip)")
    p.add_argument("--vae-images", type=int, default=64, help="held-out scenes for the autoencoder (0: skip)")
    p.add_argument("--inv-images", type=int, default=4, help="held-out scenes for the ablation (0: skip)")
    p.add_argument("--photos", nargs="*", default=["astronaut", "cat", "coffee"], help="photo ids for the photo ablation ([] : skip)")
    p.add_argument("--no-photo-n20", action="store_true", help="skip null-text N=20 on photos")
    p.add_argument("--no-global", action="store_true", help="skip global null-text")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--attention-images", type=int, default=8, help="one-object scenes for the editability check (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pipe = load_pipeline(args.model).to(resolve_device(args.device))
    diffusion = Diffusion(pipe, num_inference_steps=args.steps, guidance_scale=7.5)
    res = pipeline_resolution(pipe)
    # Recorded relative to the repository when inside it: reports must not carry a machine's paths.
    model_name = str(Path(args.model).resolve().relative_to(ROOT)) if Path(args.model).resolve().is_relative_to(ROOT) else args.model
    report = {"model": model_name, "resolution": res, "latent_size": pipe.unet.config.sample_size, "steps": args.steps, "seed": args.seed,
              "threads": args.threads, "device": str(pipe.device)}
    training = Path(args.model) / "training.json"
    if training.exists():
        info = json.loads(training.read_text())
        report["holdout_photos"] = info.get("config", {}).get("vae_train", {}).get("holdout_photos", [])
    else:
        report["holdout_photos"] = []

    samples = {}
    if args.text_images:
        print("(i) text control", flush=True)
        tc = text_control(diffusion, res, args.text_images, args.seed, args.batch, [7.5, 1.0])
        samples = tc.pop("_samples")
        report["text_control"] = tc
    if args.vae_images:
        print("(ii) autoencoder", flush=True)
        ids, images, _ = load_batch(ScenesDataset(res, num_images=args.vae_images, seed=args.seed + 1, split="heldout"))
        report["autoencoder_scenes"] = autoencoder(diffusion, images, ids)
        ids, images, _ = load_batch(SampleImages(res))
        report["autoencoder_photos_all"] = autoencoder(diffusion, images, ids)
        held = [k for k, i in enumerate(ids) if i in set(report["holdout_photos"])]
        if held:
            report["autoencoder_photos_heldout"] = autoencoder(diffusion, images[held], [ids[k] for k in held])
    if args.inv_images:
        print("(iii) inversion on held-out scenes", flush=True)
        ids, images, captions = load_batch(ScenesDataset(res, num_images=args.inv_images, seed=args.seed + 2, split="heldout"))
        methods = {
            "vae": VAEReconstruction(),
            "ddim": DDIMInversion(),
            "null_text_N10": NullTextInversion(num_inner_steps=10),
            "random_pivot_N10": RandomPivotNullText(num_inner_steps=10),
        }
        if not args.no_global:
            methods["global_10_passes"] = GlobalNullTextInversion(num_passes=10)
        report["inversion_scenes"] = ablation(diffusion, images, captions, ids, args.seed, methods)
    if args.photos:
        print("(iii) inversion on photos", flush=True)
        ids, images, captions = load_batch(SampleImages(res, names=args.photos))
        methods = {"vae": VAEReconstruction(), "ddim": DDIMInversion(), "null_text_N10": NullTextInversion(num_inner_steps=10)}
        if not args.no_photo_n20:
            methods["null_text_N20"] = NullTextInversion(num_inner_steps=20)
        report["inversion_photos"] = ablation(diffusion, images, captions, ids, args.seed, methods)
    if args.attention_images:
        print("(iv) attention localisation", flush=True)
        report["attention_localisation"] = attention_localisation(diffusion, res, args.attention_images, args.seed)
    report["checks"] = checks(report)
    report["minutes"] = (time.perf_counter() - t_start) / 60
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pocket_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "pocket_eval.md").write_text(md)
    if samples:
        from PIL import Image

        rows = [torch.cat(list(v), dim=-1) for v in samples.values()]
        grid = torch.cat(rows, dim=-2).permute(1, 2, 0).numpy()
        Image.fromarray(grid).save(out / "text_control_samples.png")
    print(md, flush=True)
    return report
