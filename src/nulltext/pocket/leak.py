"""The caption leak through the padding positions: measured, and the training options against it.

The pocket text encoder is causal and trained from scratch, so its EOS and padding outputs each see
the whole caption; measured on the CPU stand-ins, the UNet's cross-attention puts ~80% of its mass
on the padding positions, so a swapped word changes what most of the attention brings to every
pixel, and Prompt-to-Prompt's word swap redraws the picture. On SD most of the mass sits on the
start token, whose output no prompt can change.

Measures (``scripts/measure_pocket_leak.py`` prints them for a saved model):

- :func:`attention_mass`: the share of each cross-attention layer's mass on the start token, the
  caption's words, the EOS and the padding positions (conditional pass, mean over queries, heads,
  captions and timesteps);
- :func:`encoder_change`: the relative change of the text encoder's output per position class when
  one object's colour word is swapped;
- :func:`edit_footprint_probe`: null-text inversion + Prompt-to-Prompt colour swaps of
  :func:`nulltext.editing.benchmark.colour_swap_cases`, their footprint and background PSNR.

Training options (recipe key ``padding``; all off in the stock recipes):

- ``attention_weight`` (:func:`padding_attention_loss`): the mass every cross-attention layer puts on
  the EOS and padding positions, as a loss: it moves off them, to the start token and the words
  (which the grounding loss holds to their regions);
- ``match_weight`` (:func:`padding_match_loss`): the text encoder's padding outputs pulled to the
  empty caption's (stop-gradient target), which makes them caption-independent in the model itself,
  so the exported model needs nothing the stock pipeline does not do (replacing them only while
  training, or masking them in the UNet's attention, would leave the stock pipeline, which passes
  no attention mask, reading outputs the UNet never saw);
- ``empty_start_weight`` / ``empty_start_min`` / ``empty_start_max`` (:func:`empty_start_loss`):
  the empty caption's mass on the start token held within [min, max] (log-odds hinges). This sets
  how much the unconditional branch, the one null-text optimises, reads keys whose embeddings it
  can change: the grounded run's went to 100% start, identically at every pixel, and null-text lost
  its leverage there; with a ceiling alone (0.8) it fell to 0-10% and null-text's embeddings then
  steer the edits as well (models/pocket/README.md);
- ``context_length`` (:class:`~nulltext.scenes.LayoutTokenizer`'s and the exported tokenizer's
  ``model_max_length``): fewer padding positions (the longest template caption has 31 tokens with
  BOS and EOS); the stock pipeline pads to the tokenizer's ``model_max_length``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from nulltext.pocket.grounding import recording_cross_attention

POSITION_CLASSES = ("start", "words", "eos", "padding")


def caption_ends(ids: Tensor, eos: int) -> Tensor:
    """int64 ``[n]``: each row's first EOS position (its number of tokens before EOS)."""
    return (ids == eos).int().argmax(1)


def position_classes(ids: Tensor, eos: int) -> Tensor:
    """int64 ``[n, K]``: 0 start token, 1 caption words, 2 the first EOS, 3 padding (the later EOS)."""
    k = torch.arange(ids.shape[1], device=ids.device)[None]
    end = caption_ends(ids, eos)[:, None]
    return torch.where(k == 0, 0, torch.where(k < end, 1, torch.where(k == end, 2, 3)))


def padding_attention_loss(maps: Sequence[Tensor], ids: Tensor, eos: int, skip: Tensor | None = None) -> Tensor:
    """Mean over layers, samples (those not in ``skip``, [n] bool) and queries of the attention mass on
    the EOS and padding positions."""
    tail = (position_classes(ids, eos) >= 2).float()  # [n, K]
    keep = torch.ones(ids.shape[0], device=tail.device) if skip is None else (~skip).to(tail.device).float()
    per_sample = [torch.einsum("bqk,bk->bq", a.float(), tail).mean(1) for a in maps]  # [n] each
    return torch.stack([(m * keep).sum() / keep.sum().clamp_min(1) for m in per_sample]).mean()


def empty_start_settings(padding) -> tuple:
    """(weight, min, max) of the recipe's ``padding`` node, as given (``check_config`` checks them);
    absent keys (recipes of runs started before the option existed, which must still resume) read
    as off, 0 and 0.8."""
    return padding.get("empty_start_weight", 0.0), padding.get("empty_start_min", 0.0), padding.get("empty_start_max", 0.8)


def empty_start_loss(maps: Sequence[Tensor], empty: Tensor, low: float, high: float) -> Tensor:
    """Mean over layers, the empty captions (``empty``, [n] bool) and queries of how far the start
    token's log-odds x = log p_start - log(1 - p_start) lie outside [logit(low), logit(high)]:
    relu(logit(low) - x) + relu(x - logit(high)) (``low`` 0: no floor); 0 without empty captions.
    In log-odds because a saturated softmax (p_start -> 1, the grounded run's empty caption) has
    vanishing gradients in p itself; the gradient of x wrt each other key's logit is minus that key's
    share of the rest, which does not vanish. ``1 - p_start`` is summed from the other keys'
    probabilities, not subtracted, so it keeps its precision."""
    if not bool(empty.any()):
        return maps[0].new_zeros(())
    floor = -math.inf if low <= 0 else math.log(low / (1 - low))
    ceiling = math.log(high / (1 - high))
    tiny = torch.finfo(torch.float32).tiny
    outside = []
    for a in maps:
        a = a[empty.to(a.device)].float()
        x = a[..., 0].clamp_min(tiny).log() - a[..., 1:].sum(-1).clamp_min(tiny).log()
        outside.append((torch.relu(floor - x) + torch.relu(x - ceiling)).mean())
    return torch.stack(outside).mean()


def start_spread(maps: Tensor) -> Tensor:
    """Mean over samples of the standard deviation over queries (pixels) of the start token's weight,
    for ``[n, queries, keys]`` maps: 0 when every pixel weighs it alike."""
    return maps[..., 0].float().std(dim=1).mean()


def layer_label(name: str) -> str:
    """A cross-attention module's name without the suffix every one of them shares."""
    return name.replace(".transformer_blocks.0.attn2", "")


def padding_match_loss(outputs: Tensor, empty: Tensor, ids: Tensor, eos: int, dropped: Tensor) -> Tensor:
    """sum ||h - e||^2 / sum ||e||^2 over the padding positions of the captions kept (not dropped):
    ``outputs`` ``[n, K, D]`` the text encoder's, ``empty`` ``[1, K, D]`` the empty caption's (detached)."""
    padding = (position_classes(ids, eos) == 3) & ~dropped.to(ids.device)[:, None]
    weight = padding.float()[..., None]
    target = empty.detach().float().expand_as(outputs)
    diff = ((outputs.float() - target) ** 2 * weight).sum()
    return diff / ((target**2) * weight).sum().clamp_min(torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------------------------
# measures
# ------------------------------------------------------------------------------------------------


def cross_attention_layers(unet, places: Sequence[str]) -> list[str]:
    """Names of the cross-attention modules in ``places``, in the order the UNet calls them (down
    blocks, middle block, up blocks; ``attn_processors`` lists the middle block last)."""
    from nulltext.editing.attention import PLACES, place_in_unet

    names = [name for name in unet.attn_processors if name.endswith("attn2.processor") and place_in_unet(name) in places]
    return [name[: -len(".processor")] for name in sorted(names, key=lambda name: PLACES.index(place_in_unet(name)))]


@torch.no_grad()
def attention_mass(diffusion, scenes, timesteps: Sequence[int] = (900, 500, 100), seed: int = 0, empty_caption: bool = False) -> dict:
    """Where each cross-attention layer's mass goes (:data:`POSITION_CLASSES`), on ``scenes``
    rendered at the model's resolution, encoded, noised to each timestep (seeded noise) and run
    through the UNet once with their captions. Returns ``{"layers": {name: {"side", class: share}},
    "mean": {class: share}}``, shares averaged over queries, heads, scenes and timesteps; the mean
    is over layers. ``empty_caption``: the UNet reads the empty caption instead (the unconditional
    branch null-text optimises); each layer also gives ``start_spatial_std``, the standard deviation
    over pixels of the start token's weight (0: the same at every pixel, so an embedding can only
    shift that layer's output by a constant)."""
    from nulltext.models import pipeline_resolution
    from nulltext.scenes import layout_from_scenes, render_layout

    unet, tokenizer = diffusion.unet, diffusion.tokenizer
    images = render_layout(layout_from_scenes(scenes, seed=seed, jitter=False), pipeline_resolution(diffusion.pipe))
    z0 = diffusion.encode_images(images)
    captions = [""] * len(scenes) if empty_caption else [s.caption for s in scenes]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    cond = diffusion.encode_text(captions)
    onehot = torch.nn.functional.one_hot(position_classes(ids, tokenizer.eos_token_id), len(POSITION_CLASSES)).float().to(z0.device)
    names = cross_attention_layers(unet, ("down", "mid", "up"))
    sums = torch.zeros(len(names), len(POSITION_CLASSES))
    start_std = torch.zeros(len(names))
    alphas = diffusion.pipe.scheduler.alphas_cumprod.to(z0.device, torch.float32)
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed * 1000 + int(t))).to(z0.device)
        zt = alphas[t].sqrt() * z0 + (1 - alphas[t]).sqrt() * noise
        with recording_cross_attention(unet, ("down", "mid", "up")) as recorder:
            unet(zt, torch.full((len(scenes),), int(t), device=z0.device), encoder_hidden_states=cond)
        if len(recorder.maps) != len(names):
            raise RuntimeError(f"recorded {len(recorder.maps)} cross-attention calls for {len(names)} layers")
        for i, a in enumerate(recorder.maps):
            sums[i] += torch.einsum("bqk,bkc->c", a.float(), onehot).cpu() / (a.shape[0] * a.shape[1])
            start_std[i] += start_spread(a).cpu()
    shares = sums / len(timesteps)
    layers = {
        name: {"side": math.isqrt(a.shape[1]), **dict(zip(POSITION_CLASSES, s.tolist())), "start_spatial_std": float(std) / len(timesteps)}
        for name, a, s, std in zip(names, recorder.maps, shares, start_std)
    }
    return {"timesteps": list(timesteps), "captions": captions, "layers": layers, "mean": dict(zip(POSITION_CLASSES, shares.mean(0).tolist()))}


@torch.no_grad()
def encoder_change(diffusion, scenes, targets) -> dict:
    """Relative change ``||h(target) - h(source)|| / ||h(source)||`` of the text encoder's output,
    pooled over the positions of each class, for caption pairs that differ in one word (one token;
    ``scenes[i]`` -> ``targets[i]``): the start token, the words before the swapped one, the swapped
    word, the words after it, the EOS and the padding."""
    tokenizer = diffusion.tokenizer
    sources, goals = [s.caption for s in scenes], [s.caption for s in targets]
    ids = tokenizer(sources, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    goal_ids = tokenizer(goals, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    differ = ids != goal_ids
    if not bool((differ.sum(1) == 1).all()):
        raise ValueError("every caption pair must differ in exactly one token")
    h, g = diffusion.encode_text(sources).cpu().float(), diffusion.encode_text(goals).cpu().float()
    k = torch.arange(ids.shape[1])[None]
    swapped = differ.int().argmax(1)[:, None]
    end = caption_ends(ids, tokenizer.eos_token_id)[:, None]
    classes = {
        "start": k == 0,
        "earlier words": (k > 0) & (k < swapped),
        "swapped word": k == swapped,
        "later words": (k > swapped) & (k < end),
        "eos": k == end,
        "padding": k > end,
    }
    out = {}
    for name, where in classes.items():
        w = where.float()[..., None]
        base = ((h**2) * w).sum().sqrt()
        out[name] = float(((g - h) ** 2 * w).sum().sqrt() / base) if base > 0 else float("nan")
    return out


def edit_footprint_probe(diffusion, num_cases: int, seed: int = 0, inner_steps: int = 10) -> dict:
    """Null-text inversion (``inner_steps`` per step) + Prompt-to-Prompt word swap (default settings)
    on ``num_cases`` colour swaps of :func:`~nulltext.editing.benchmark.colour_swap_cases`:
    the edits' footprint (:func:`~nulltext.editing.metrics.edit_footprint`, pixels changed by more
    than 0.1 against the reconstruction) and background PSNR (outside the edited object dilated by
    one pixel, against the input), means over the cases."""
    from nulltext.editing import edit
    from nulltext.editing.benchmark import colour_swap_cases
    from nulltext.editing.metrics import edit_footprint, masked_psnr
    from nulltext.methods import NullTextInversion, image_seed
    from nulltext.models import pipeline_resolution

    cases = colour_swap_cases(num_cases, pipeline_resolution(diffusion.pipe), seed)
    inversion = NullTextInversion(num_inner_steps=inner_steps).invert(
        diffusion, diffusion.encode_images(cases.images), cases.captions, [image_seed(seed, i) for i in cases.ids]
    )
    footprints, psnrs = [], []
    for b, target in enumerate(cases.target_captions):
        out = edit(diffusion, inversion.select(b), [target], {"mode": "replace"}).images.float() / 255
        recon, edited = out[:1], out[1:2]
        footprints.append(float(edit_footprint(edited, recon)[0]))
        psnrs.append(float(masked_psnr(edited, cases.images[b : b + 1].float() / 255, 1 - cases.region[b : b + 1])[0]))
    return {"cases": num_cases, "footprint": sum(footprints) / num_cases, "background_psnr": sum(psnrs) / num_cases,
            "per_case_footprint": footprints}


def swapped_colour_scenes(n: int):
    """``n`` one-object scenes (the evaluation's) and the same with the colour word swapped to the next colour."""
    from dataclasses import replace

    from nulltext.pocket.evaluation import single_object_scenes
    from nulltext.scenes import COLOURS

    scenes = single_object_scenes(n)
    swap = lambda o: replace(o, colour=COLOURS[(COLOURS.index(o.colour) + 1) % len(COLOURS)])  # noqa: E731
    return scenes, [replace(s, objects=(swap(s.objects[0]),)) for s in scenes]


def markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    mass = report["attention_mass"]
    lines = [f"# Caption leak: `{report['model']}`", "",
             f"## Cross-attention mass by key position ({len(mass['captions'])} one-object captions, t = {', '.join(map(str, mass['timesteps']))})", "",
             "| layer | map | " + " | ".join(POSITION_CLASSES) + " |", "|---|---|" + "---|" * len(POSITION_CLASSES)]
    for name, row in mass["layers"].items():
        lines.append(f"| {layer_label(name)} | {row['side']}x{row['side']} | " + " | ".join(pct(row[c]) for c in POSITION_CLASSES) + " |")
    lines.append("| **mean over layers** | | " + " | ".join(pct(mass["mean"][c]) for c in POSITION_CLASSES) + " |")
    empty = report.get("attention_mass_empty")
    if empty:
        lines += ["", "## The empty caption (the unconditional branch null-text optimises)", "",
                  "| layer | start token | EOS + padding | start weight's std over pixels |", "|---|---|---|---|"]
        for name, row in empty["layers"].items():
            lines.append(f"| {layer_label(name)} | {pct(row['start'])} | {pct(row['eos'] + row['padding'])} | {row['start_spatial_std']:.4f} |")
    change = report["encoder_change"]
    lines += ["", "## Text encoder output change when the colour word is swapped (relative norm)", "",
              "| " + " | ".join(change) + " |", "|" + "---|" * len(change), "| " + " | ".join(f"{v:.2f}" for v in change.values()) + " |"]
    probe = report.get("edit_probe")
    if probe:
        lines += ["", f"## Null-text + Prompt-to-Prompt colour swaps ({probe['cases']} cases)", "",
                  "| footprint | background PSNR (dB) |", "|---|---|", f"| {pct(probe['footprint'])} | {probe['background_psnr']:.2f} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """``scripts/measure_pocket_leak.py``: the three measures for one saved model; writes leak.json / leak.md."""
    from nulltext.diffusion import Diffusion
    from nulltext.models import load_pipeline, pocket_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=pocket_path(), help="a saved pipeline folder (default: models/pocket)")
    p.add_argument("--out", default=None, help="folder for leak.json / leak.md (default: print only)")
    p.add_argument("--scenes", type=int, default=8, help="one-object scenes for the attention mass and the encoder change")
    p.add_argument("--timesteps", type=int, nargs="+", default=[900, 500, 100])
    p.add_argument("--edit-cases", type=int, default=0, help="colour swaps for the footprint probe (0: skip; ~1 min per case at 64 px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusion = Diffusion(load_pipeline(args.model), num_inference_steps=50, guidance_scale=7.5)
    scenes, targets = swapped_colour_scenes(args.scenes)
    report = {"model": args.model, "attention_mass": attention_mass(diffusion, scenes, args.timesteps, args.seed),
              "attention_mass_empty": attention_mass(diffusion, scenes, args.timesteps, args.seed, empty_caption=True),
              "encoder_change": encoder_change(diffusion, scenes, targets)}
    if args.edit_cases:
        report["edit_probe"] = edit_footprint_probe(diffusion, args.edit_cases, args.seed)
    text = markdown(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "leak.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "leak.md").write_text(text)
    print(text, flush=True)
    return report
