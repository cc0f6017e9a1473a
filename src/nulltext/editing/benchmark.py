"""``nulltext edit_bench``: how well each inversion method lets Prompt-to-Prompt edit, measured offline.

The paper's claim that textual inversion with a pivot "reconstructs as well but edits worse"
(ALGORITHM.md s.6), and the background comparisons of later work (PIE-Bench, s.8), need edits whose
right answer is known. Procedural scenes provide them: each case swaps the colour word of the first
object of a held-out scene ("a large red circle ..." -> "a large blue circle ...", a colour no object
of the scene has), and the renderer draws the ideal result. Per method and case:

- **success**: :class:`~nulltext.scenes.SceneChecker` finds every object of the *target* caption
  (colour and position) in the edit; the reconstruction is checked against the source caption the
  same way (what the inversion itself keeps);
- **background**: PSNR / SSIM / LPIPS of the edit against the input outside the edited object (its
  pixels in the input or the ideal render, dilated by ``dilate`` px): PIE-Bench's background
  measures, with an exact mask;
- **ideal PSNR**: the edit against the ideal render, whole image; **footprint** (fraction of pixels
  changed vs the reconstruction); seconds per inversion and per edit.

Two reference rows: ``ideal`` scores the renders themselves (the checker's ceiling; background PSNR
inf), ``ideal_vae`` the same passed through the model's autoencoder (the ceiling of any latent
method: reconstruction = decode(encode(input)), edit = decode(encode(ideal render))).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

COLUMNS = (
    ("method", None),
    ("recon PSNR", "recon_psnr"),
    ("recon ok", "recon_ok"),
    ("edit success", "success"),
    ("bg PSNR", "background_psnr"),
    ("bg SSIM", "background_ssim"),
    ("bg LPIPS", "background_lpips"),
    ("ideal PSNR", "ideal_psnr"),
    ("footprint", "footprint"),
    ("s/inversion", "seconds_inversion"),
    ("s/edit", "seconds_edit"),
)
PERCENT = {"recon_ok", "success", "footprint"}


@dataclasses.dataclass
class EditCases:
    """Scenes and their colour-swap edits: uint8 images [N,3,R,R], captions, the edited region [N,1,R,R]."""

    ids: list[str]
    images: torch.Tensor
    ideal: torch.Tensor
    region: torch.Tensor
    scenes: list
    target_scenes: list
    swaps: list[tuple[str, str]]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes]

    @property
    def target_captions(self) -> list[str]:
        return [s.caption for s in self.target_scenes]


def colour_swap_cases(
    num_cases: int, resolution: int, seed: int, split: str = "heldout", dilate: int = 1, object_size: str | None = "large"
) -> EditCases:
    """``num_cases`` scenes of ``sample_layout(num_cases, seed, split)`` (every object drawn at
    ``object_size``, None: as sampled); object 0 of each gets a colour no object of its scene has
    (drawn with ``seed``); the edited region is where the two renders differ."""
    from nulltext.scenes import COLOURS, SIZES, render_layout, sample_layout

    layout = sample_layout(num_cases, seed, split)
    if object_size is not None:
        layout = dataclasses.replace(layout, size=torch.full_like(layout.size, SIZES.index(object_size)))
    g = torch.Generator().manual_seed(seed)
    colours = layout.colour.clone()
    swaps = []
    for i in range(num_cases):
        used = set(layout.colour[i, : int(layout.count[i])].tolist())
        free = [c for c in range(len(COLOURS)) if c not in used]
        colours[i, 0] = free[int(torch.randint(len(free), (1,), generator=g))]
        swaps.append((COLOURS[int(layout.colour[i, 0])], COLOURS[int(colours[i, 0])]))
    target = dataclasses.replace(layout, colour=colours)
    images, ideal = render_layout(layout, resolution), render_layout(target, resolution)
    changed = (images != ideal).any(dim=1, keepdim=True).float()
    region = F.max_pool2d(changed, 2 * dilate + 1, stride=1, padding=dilate) if dilate > 0 else changed
    return EditCases(
        ids=[f"case-{i:03d}" for i in range(num_cases)],
        images=images,
        ideal=ideal,
        region=region,
        scenes=layout.scenes(),
        target_scenes=target.scenes(),
        swaps=swaps,
    )


class EditScorer:
    """The measures of one method's edits (and reconstructions) on :class:`EditCases`."""

    def __init__(self, cases: EditCases, lpips_net: str = "alex", footprint_threshold: float = 0.1):
        from nulltext.metrics import load_lpips
        from nulltext.scenes import SceneChecker

        self.cases = cases
        self.checker = SceneChecker(resolution=cases.images.shape[-1])
        self.lpips, self.lpips_spec = load_lpips(lpips_net)
        self.footprint_threshold = footprint_threshold

    def readable(self, images: torch.Tensor, scenes: list) -> torch.Tensor:
        """[N] bool: every object of ``scenes`` found with its colour at its position."""
        result = self.checker(images, scenes)
        return result.colour_ok & result.position_ok

    @torch.no_grad()
    def score(self, edits: torch.Tensor, reconstructions: torch.Tensor) -> list[dict]:
        from nulltext.editing.metrics import background_comparison, edit_footprint, finite_or_text
        from nulltext.metrics import psnr_per_image

        c = self.cases
        unit = lambda x: x.float() / 255  # noqa: E731
        x, e, r, ideal = unit(c.images), unit(edits), unit(reconstructions), unit(c.ideal)
        columns = {
            "recon_psnr": psnr_per_image(r, x),
            "recon_ok": self.readable(reconstructions, c.scenes).float(),
            "success": self.readable(edits, c.target_scenes).float(),
            "ideal_psnr": psnr_per_image(e, ideal),
            "footprint": edit_footprint(e, r, self.footprint_threshold),
        }
        background = background_comparison(e, x, 1 - c.region, self.lpips)  # the same measures as `nulltext edit`
        return [
            {**{k: finite_or_text(float(v[i])) for k, v in columns.items()}, **{f"background_{k}": v for k, v in background[i].items()}}
            for i in range(len(c.ids))
        ]


def summarise(rows: list[dict]) -> dict:
    """Mean of every measure over the cases (inf stays inf: the ideal row's background PSNR)."""
    from nulltext.editing.metrics import finite_or_text

    return {k: finite_or_text(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}


def format_table(summary: dict[str, dict]) -> str:
    """Markdown table, one row per method."""

    def cell(key: str | None, name: str, s: dict) -> str:
        if key is None:
            return name
        v = s.get(key)
        if v is None:
            return "n/a"
        v = float(v)
        if math.isinf(v):
            return "inf"
        return f"{100 * v:.0f}%" if key in PERCENT else f"{v:.3f}" if "lpips" in key or "ssim" in key else f"{v:.2f}"

    header = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule] + ["| " + " | ".join(cell(k, name, s) for _, k in COLUMNS) + " |" for name, s in summary.items()]
    return "\n".join(lines)


def check_edit_bench(cfg: DictConfig) -> tuple[list[str], dict, dict, dict]:
    """``nulltext edit_bench``'s settings, before any model loads: returns the method names, their
    options, the edit settings and the built methods (name -> InversionMethod)."""
    from nulltext.apps import check_common, check_methods, method_options, plain
    from nulltext.editing.edit import SETTING_KEYS, EditSettings
    from nulltext.editing.errors import EditError
    from nulltext.methods import VAEReconstruction
    from nulltext.scenes import SIZES, SPLITS
    from nulltext.validation import SettingError, check_bool, check_choice, check_int

    check_common(cfg)
    methods = plain(cfg.methods)
    if not isinstance(methods, list):
        raise SettingError(f"methods={methods!r} is not allowed: a list of inversion methods, e.g. '[null_text]'")
    if not methods:
        raise EditError("give at least one inversion method: methods='[null_text]'")
    options = method_options(cfg.get("method_options"))
    strays = sorted(set(options) - set(methods))
    if strays:
        raise SettingError(f"method_options has {', '.join(map(str, strays))}, not in methods: give {{method: {{option: value}}}} for methods {methods}")
    options = {name: method_options(options.get(name), f"method_options.{name}") for name in methods}
    check_int("num_cases", cfg.num_cases, 1)
    check_choice("split", cfg.split, SPLITS)
    check_choice("object_size", cfg.object_size, (*SIZES, None))
    check_int("dilate", cfg.dilate, 0)  # 0: the exact object
    check_int("grid_cases", cfg.grid_cases, 0)  # 0: no grid.png
    local_blend = check_bool("local_blend", cfg.local_blend)
    settings = {k: plain(cfg[k]) for k in SETTING_KEYS if k in cfg}
    if settings.get("mode") == "sdedit" and local_blend:
        raise EditError("local_blend works with Prompt-to-Prompt modes, not sdedit")
    EditSettings.from_dict(settings)
    built = check_methods(cfg, options)
    unusable = [name for name, m in built.items() if isinstance(m, VAEReconstruction)]
    if unusable:
        raise EditError(f"{', '.join(unusable)}: a VAE reconstruction has no embeddings to edit with; drop it from methods")
    no_p2p = [f"{name} ({m.edit_instead})" for name, m in built.items() if not m.editable]
    if no_p2p:
        raise EditError(f"no Prompt-to-Prompt editing for: {'; '.join(no_p2p)}; drop them from methods")
    return methods, options, settings, built


def edit_cases(diffusion, inversion, cases: EditCases, settings, local_blend: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each case's colour swap applied to its row of ``inversion`` with the same edit ``settings`` (a
    local blend on [source colour, target colour] when ``local_blend``): uint8 (edits, reconstructions)."""
    from nulltext.editing.edit import edit

    outs = []
    for b, ((src, tgt), prompt) in enumerate(zip(cases.swaps, cases.target_captions)):
        case_settings = dict(settings, blend_words=[src, tgt]) if local_blend else settings
        outs.append(edit(diffusion, inversion.select(b), [prompt], case_settings).images)
    return torch.cat([o[1:2] for o in outs]), torch.cat([o[:1] for o in outs])


def run_edit_bench(cfg: DictConfig) -> dict:
    """Invert the cases with every method of ``cfg.methods``, edit each, score; writes edit_bench.json/.md and grid.png."""
    from hydra.utils import instantiate

    from nulltext.editing.visual import enlarge, grid, to_pil
    from nulltext.io import atomic_write_json, atomic_write_text
    from nulltext.methods import image_seed
    from nulltext.models import pipeline_resolution, resolve_device
    from nulltext.provenance import provenance
    from nulltext.reconstruction import to_uint8
    from nulltext.runner import save_png

    methods, options, settings, built = check_edit_bench(cfg)
    output_dir = Path(cfg.paths.output_dir)
    torch.manual_seed(cfg.seed)
    pipe = instantiate(cfg.model).to(resolve_device(cfg.get("device")))
    diffusion = instantiate(cfg.diffusion, pipe=pipe)
    resolution = pipeline_resolution(pipe)
    cases = colour_swap_cases(int(cfg.num_cases), resolution, int(cfg.seed), str(cfg.split), int(cfg.dilate), cfg.object_size)
    scorer = EditScorer(cases, cfg.lpips_net, float(cfg.footprint_threshold))
    z0 = diffusion.encode_images(cases.images)
    seeds = [image_seed(int(cfg.seed), i) for i in cases.ids]

    # The ceilings: the renders themselves, and the same through the autoencoder (what any latent
    # method can at best give back; at 32 px it blurs small shapes enough to fail some checks).
    with torch.no_grad():
        vae_input = to_uint8(diffusion.decode(z0)).cpu()
        vae_ideal = to_uint8(diffusion.decode(diffusion.encode_images(cases.ideal))).cpu()
    per_case = {"ideal": scorer.score(cases.ideal, cases.images), "ideal_vae": scorer.score(vae_ideal, vae_input)}
    seconds = {k: {"seconds_inversion": 0.0, "seconds_edit": 0.0} for k in per_case}
    edited = {}
    for name, method in built.items():
        start = time.perf_counter()
        inversion = method.invert(diffusion, z0, cases.captions, seeds)
        t_inv = (time.perf_counter() - start) / len(cases.ids)
        start = time.perf_counter()
        edited[name], recon = edit_cases(diffusion, inversion, cases, settings, bool(cfg.local_blend))
        t_edit = (time.perf_counter() - start) / len(cases.ids)
        per_case[name] = scorer.score(edited[name], recon)
        seconds[name] = {"seconds_inversion": t_inv, "seconds_edit": t_edit}
        print(f"edit_bench: {name} done ({t_inv:.1f} s/inversion, {t_edit:.1f} s/edit)", flush=True)

    summary = {name: {**summarise(rows), **seconds[name]} for name, rows in per_case.items()}
    table = format_table(summary)
    shown = min(int(cfg.grid_cases), len(cases.ids))
    if shown:
        tiles, labels = [], []
        for i in range(shown):
            row = [cases.images[i], cases.ideal[i], *[edited[m][i] for m in methods]]
            tiles += [enlarge(to_pil(x), 128) for x in row]
            labels += [f"input: {cases.swaps[i][0]}", f"ideal: {cases.swaps[i][1]}", *methods]
        save_png(output_dir / "grid.png", grid(tiles, labels, columns=2 + len(methods)))
    report = {
        "methods": methods,
        "method_options": options,
        "method_configs": {name: method.config() for name, method in built.items()},
        "edit_settings": settings,
        "local_blend": bool(cfg.local_blend),
        "cases": [
            {"id": i, "caption": s.caption, "target": t.caption, "swap": list(w), "edited_fraction": float(r.mean())}
            for i, s, t, w, r in zip(cases.ids, cases.scenes, cases.target_scenes, cases.swaps, cases.region)
        ],
        "measures": {
            "success": "SceneChecker: every object of the target caption found with its colour at its position",
            "recon_ok": "the same check of the reconstruction against the source caption",
            "background": f"outside the edited object (exact, dilated {int(cfg.dilate)} px) vs the input; images in [0,1]",
            "lpips": scorer.lpips_spec,
            "ideal_psnr": "whole image vs the renderer's drawing of the target caption",
            "footprint_threshold": float(cfg.footprint_threshold),
            "clip_score": None,
            "clip_score_reason": "not used: success is read by the scene checker, which needs no weights",
        },
        "summary": summary,
        "per_case": per_case,
        "config": OmegaConf.to_container(cfg, resolve=True),
        **provenance(),
    }
    atomic_write_json(output_dir / "edit_bench.json", report)
    atomic_write_text(output_dir / "edit_bench.md", f"# Edit benchmark ({len(cases.ids)} colour swaps)\n\n{table}\n")
    print(table)
    print(f"edit_bench: {output_dir}")
    return summary
