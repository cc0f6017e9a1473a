"""``nulltext edit`` and ``nulltext attention``: Hydra apps over ``conf/edit.yaml`` / ``conf/attention.yaml``.

    nulltext edit artifact=<run>/inversions/<id>.safetensors prompts='["a photo of a dog"]'
    nulltext edit image=cat.jpg caption="a photo of a cat" prompts='["a photo of a dog"]' blend_words='[cat,dog]'
    nulltext edit artifact=... prompts='["a photo of a fluffy cat"]' mode=refine
    nulltext edit artifact=... prompts='["a photo of a cat"]' mode=reweight reweight='{cat: 2.0}'
    nulltext edit artifact=... prompts='["a photo of a dog"]' mode=sdedit strength=0.5
    nulltext edit model=sd3 image=cat.jpg caption="a photo of a cat" prompts='["a photo of a dog"]' mode=flowedit
    nulltext attention artifact=... [prompt="a photo of a cat"]

The task functions :func:`run_edit` and :func:`run_attention` take a composed config and are what
tests call; each first checks every setting (:func:`check_edit`, :func:`check_attention`) before
any model loads. Heavy imports happen inside them, so ``nulltext.cli`` stays cheap to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from nulltext.apps import CONFIG_DIR, check_common, check_editable_family, check_methods, given_on_command_line, method_options, plain, report_errors
from nulltext.folders import in_own_folder
from nulltext.validation import SettingError, check_choice, check_int, check_text

if TYPE_CHECKING:  # the editing modules load torch and diffusers: imported where they run
    from nulltext.editing.edit import EditSettings

GRID_MIN_SIDE = 256  # grid panels are enlarged (nearest) to at least this; single files keep their size


def _optional(check, name: str, value, *args):
    return None if value is None else check(name, value, *args)


def check_edit(cfg: DictConfig) -> tuple[list[str], "EditSettings"]:
    """``nulltext edit``'s settings (before any model loads): the source, prompts, edit settings, method."""
    from nulltext.editing.edit import SETTING_KEYS, EditSettings
    from nulltext.editing.errors import EditError
    from nulltext.errors import ImageError

    check_common(cfg)
    for key in ("artifact", "image", "mask", "clip_model"):
        _optional(check_text, key, cfg.get(key))
    for key in ("image", "mask"):  # read after the model loads: checked here, before
        if cfg.get(key) and not Path(cfg[key]).expanduser().is_file():
            raise ImageError(f"{key}={cfg[key]!r}: no such file, give the path of an image file")
    prompts = None if OmegaConf.is_missing(cfg, "prompts") else plain(cfg.prompts)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not isinstance(prompts, list):
        raise EditError('give the target prompts: prompts=\'["a photo of a dog"]\'')
    for prompt in prompts:
        check_text("prompts", prompt)
    settings = EditSettings.from_dict({k: plain(cfg[k]) for k in SETTING_KEYS if k in cfg})
    if settings.mode == "flowedit":
        _check_flowedit(cfg)
    elif not cfg.get("artifact"):
        if not (cfg.get("image") and cfg.get("caption")):
            raise EditError("give artifact=<run>/inversions/<id>.safetensors, or image=<file> caption=<text> to invert first")
        check_text("caption", cfg.caption)
        check_methods(cfg, {cfg.method: method_options(cfg.get("method_options"))})
    return prompts, settings


def _check_flowedit(cfg: DictConfig) -> None:
    """FlowEdit edits the image file itself: with its caption and the config's model, or with an artifact's caption, model and sampler."""
    from nulltext.diffusion import check_sampler_config
    from nulltext.editing.errors import EditError
    from nulltext.models import model_shape

    if not cfg.get("image") or not (cfg.get("artifact") or cfg.get("caption")):
        raise EditError(
            "mode=flowedit (FlowEdit) edits the image itself, without an inversion: give image=<file> caption=<source prompt> "
            "(or image=<file> artifact=<inversion> for its caption, model and sampler)"
        )
    if not cfg.get("artifact"):
        check_text("caption", cfg.caption)
        shape = model_shape(cfg.model)
        if shape is not None:
            check_editable_family(shape.family, "flowedit")
        check_sampler_config(cfg.diffusion, shape.max_steps if shape else 999)


def check_attention(cfg: DictConfig) -> None:
    """``nulltext attention``'s settings (before any model loads)."""
    from nulltext.editing.attention import PLACES

    check_common(cfg)
    check_text("artifact", cfg.artifact)
    _optional(check_text, "prompt", cfg.prompt)
    _optional(check_int, "resolution", cfg.resolution, 1)
    places = plain(cfg.places)
    if not isinstance(places, list) or not places:
        raise SettingError(f"places={places!r} is not allowed: a non-empty list of {', '.join(PLACES)}")
    for place in places:
        check_choice("places", place, PLACES)
    check_int("tile_size", cfg.tile_size, 1, 4096)
    check_int("columns", cfg.columns, 1)


def _load_source(cfg: DictConfig, output_dir: Path):
    """(diffusion, inversion, record, input image uint8 [3,H,W] or None, description of the source)."""
    from hydra.utils import instantiate

    from nulltext.api import invert
    from nulltext.artifacts import open_artifact, save_artifact
    from nulltext.data import load_image
    from nulltext.editing.errors import EditError
    from nulltext.models import pipeline_resolution, resolve_device
    from nulltext.provenance import provenance

    device = resolve_device(cfg.get("device"))
    if cfg.get("artifact"):
        # The artifact's model and sampler, or those given on the command line if they fit its tensors.
        given = {key: cfg[key] if given_on_command_line(key) else None for key in ("model", "diffusion")}
        inversion, record, diffusion = open_artifact(cfg.artifact, device, given["model"], given["diffusion"])
        check_editable_family(diffusion.family.name)
        image = load_image(cfg.image, pipeline_resolution(diffusion.pipe)) if cfg.get("image") else None
        return diffusion, inversion, record, image, {"artifact": str(cfg.artifact), "image": cfg.get("image")}
    if not (cfg.get("image") and cfg.get("caption")):
        raise EditError("give artifact=<run>/inversions/<id>.safetensors, or image=<file> caption=<text> to invert first")
    pipe = instantiate(cfg.model).to(device)
    diffusion = instantiate(cfg.diffusion, pipe=pipe)
    options = plain(cfg.get("method_options")) or {}
    result = invert(
        pipe,
        cfg.image,
        cfg.caption,
        method=cfg.method,
        seed=cfg.seed,
        num_inference_steps=diffusion.schedule.num_steps,
        guidance_scale=diffusion.guidance_scale,
        **options,
    )
    image_id = Path(str(cfg.image)).stem
    record = {
        "id": image_id,
        "seed": cfg.seed,
        "method": {"name": cfg.method, **options},
        "num_inference_steps": diffusion.schedule.num_steps,
        "inversion_timestep": "target",  # what nulltext.api.invert uses
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "diffusion_config": OmegaConf.to_container(cfg.diffusion, resolve=True),
        "inversion_metrics": result.metrics,
        **provenance(),
    }
    artifact = save_artifact(output_dir / "inversions" / image_id, result.inversion, record)
    image = load_image(cfg.image, pipeline_resolution(pipe))
    return diffusion, result.inversion, record, image, {"image": str(cfg.image), "caption": cfg.caption, "artifact": str(artifact.with_suffix(".safetensors"))}


def _flowedit(cfg: DictConfig, prompts: list[str], settings: "EditSettings") -> tuple:
    """FlowEdit of ``image``: (diffusion, record, input image uint8 [3,H,W], description of the source, EditOutput)."""
    from hydra.utils import instantiate

    from nulltext.artifacts import open_artifact
    from nulltext.data import load_image
    from nulltext.editing.flowedit import PUBLISHED, flowedit
    from nulltext.families import family_of
    from nulltext.models import pipeline_resolution, resolve_device

    device = resolve_device(cfg.get("device"))
    if cfg.get("artifact"):
        given = {key: cfg[key] if given_on_command_line(key) else None for key in ("model", "diffusion")}
        inversion, record, diffusion = open_artifact(cfg.artifact, device, given["model"], given["diffusion"])
        check_editable_family(diffusion.family.name, "flowedit")
        caption, source = inversion.prompts[0], {"artifact": str(cfg.artifact), "image": str(cfg.image)}
    else:
        pipe = instantiate(cfg.model).to(device)
        family = family_of(pipe).name
        check_editable_family(family, "flowedit")
        # The official step count (SD3 50, FLUX 28) unless the command line sets one.
        steps = {} if given_on_command_line("diffusion.num_inference_steps") else {"num_inference_steps": PUBLISHED[family]["num_steps"]}
        diffusion = instantiate(cfg.diffusion, pipe=pipe, **steps)
        caption, source = cfg.caption, {"image": str(cfg.image), "caption": cfg.caption}
        record = {"model_config": plain(cfg.model), "diffusion_config": {**plain(cfg.diffusion), **steps}}
    image = load_image(cfg.image, pipeline_resolution(diffusion.pipe))
    options = {key: getattr(settings, key) for key in ("n_max", "n_avg", "src_guidance_scale", "tar_guidance_scale")}
    out = flowedit(diffusion, diffusion.encode_images(image.unsqueeze(0)), caption, prompts, seed=cfg.seed, **options)
    return diffusion, {**record, "method": {"name": "flowedit"}}, image, source, out


def run_edit(cfg: DictConfig) -> dict:
    """Edit one inverted image; writes grid.png, reconstruction.png, edits/, masks/, metrics.json, settings.json."""
    from nulltext.editing.edit import edit
    from nulltext.editing.metrics import edit_metrics, load_mask
    from nulltext.editing.visual import enlarge, grid, slug, to_pil
    from nulltext.io import atomic_write_json
    from nulltext.provenance import provenance
    from nulltext.runner import save_png

    prompts, settings = check_edit(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if settings.mode == "flowedit":
        diffusion, record, image, source, out = _flowedit(cfg, prompts, settings)
    else:
        diffusion, inversion, record, image, source = _load_source(cfg, output_dir)
        out = edit(diffusion, inversion, prompts, settings)

    size = tuple(out.images.shape[-2:])
    if cfg.get("mask"):
        region, mask_source = load_mask(cfg.mask, size), f"file: {cfg.mask}"
    elif out.masks is not None:
        region, mask_source = out.masks, "local_blend"
    else:
        region, mask_source = None, "none"
    metrics = {
        "method": (record.get("method") or {}).get("name", "unknown"),
        "mode": settings.mode,
        "source_prompt": out.prompts[0],
        **source,
        **edit_metrics(
            out.images,
            out.prompts,
            input_image=image,
            edited_region=region,
            mask_source=mask_source,
            lpips_net=cfg.lpips_net,
            footprint_threshold=cfg.footprint_threshold,
            clip_model=cfg.get("clip_model"),
        ),
        **provenance(),
    }

    panels = [enlarge(to_pil(x), GRID_MIN_SIDE) for x in ([image] if image is not None else []) + list(out.images)]
    labels = (["input"] if image is not None else []) + ["reconstruction", *prompts]
    save_png(output_dir / "grid.png", grid(panels, labels))
    save_png(output_dir / "reconstruction.png", to_pil(out.images[0]))
    edit_files = []
    for k, prompt in enumerate(prompts):
        name = f"{k + 1:02d}_{slug(prompt)}.png"
        save_png(output_dir / "edits" / name, to_pil(out.images[k + 1]))
        edit_files.append(f"edits/{name}")
        if out.masks is not None:
            mask = (out.masks[k, 0] * 255).to(dtype=out.images.dtype)
            save_png(output_dir / "masks" / name, to_pil(mask.expand(3, -1, -1)))
    for entry, path in zip(metrics["edits"], edit_files):
        entry["file"] = path
    atomic_write_json(
        output_dir / "settings.json",
        {
            **source,
            "source_prompt": out.prompts[0],
            "prompts": prompts,
            "edit": {**settings.to_dict(), **out.settings},
            "num_inference_steps": diffusion.schedule.num_steps,
            "mask": cfg.get("mask"),
            "lpips_net": cfg.lpips_net,
            "footprint_threshold": cfg.footprint_threshold,
            "clip_model": cfg.get("clip_model"),
            "model_config": record.get("model_config"),
            "diffusion_config": record.get("diffusion_config"),
            "inversion_method": record.get("method"),
            "config": {k: plain(v) for k, v in cfg.items() if k != "hydra"},
        },
    )
    atomic_write_json(output_dir / "metrics.json", metrics)
    print(f"edits: {output_dir / 'grid.png'}")
    return metrics


def run_attention(cfg: DictConfig) -> Path:
    """Average cross-attention map of every token of a prompt, as a labelled grid (attention.png)."""
    from PIL import Image
    from safetensors.torch import save_file

    from nulltext.artifacts import open_artifact
    from nulltext.editing.attention import AttentionStore
    from nulltext.editing.edit import edit
    from nulltext.editing.tokens import token_texts
    from nulltext.editing.visual import attention_tile, grid, to_pil
    from nulltext.io import atomic_write, atomic_write_json
    from nulltext.models import resolve_device
    from nulltext.provenance import provenance
    from nulltext.runner import save_png

    check_attention(cfg)
    output_dir = Path(cfg.paths.output_dir)
    inversion, record, diffusion = open_artifact(cfg.artifact, resolve_device(cfg.get("device")))
    check_editable_family(diffusion.family.name)
    source_prompt = inversion.prompts[0]
    prompt = cfg.get("prompt") or source_prompt
    targets = [] if prompt == source_prompt else [prompt]
    store = AttentionStore()
    out = edit(diffusion, inversion, targets, store)
    row = len(out.prompts) - 1
    queries = int(cfg.resolution) ** 2 if cfg.get("resolution") else None
    places = list(plain(cfg.places))
    maps = store.aggregate(queries=queries, places=places)[row]  # [h, w, L]
    tokens = token_texts(diffusion.tokenizer, prompt)
    size = int(cfg.tile_size)
    tiles = [to_pil(out.images[row]).resize((size, size), Image.Resampling.BICUBIC)] + [attention_tile(maps[:, :, j], size) for j in range(len(tokens))]
    labels = ["sample" if targets else "reconstruction", *tokens]
    path = output_dir / "attention.png"
    save_png(path, grid(tiles, labels, columns=int(cfg.columns)))
    tensors = {"maps": maps[:, :, : len(tokens)].permute(2, 0, 1).contiguous().cpu()}
    atomic_write(output_dir / "attention.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(
        output_dir / "attention.json",
        {
            "artifact": str(cfg.artifact),
            "prompt": prompt,
            "source_prompt": source_prompt,
            "tokens": tokens,
            "map_size": list(maps.shape[:2]),
            "places": places,
            "num_steps": store.num_stored_steps,
            "average": "over heads, layers of this resolution in these places, and all sampling steps",
            **provenance(),
        },
    )
    print(f"attention: {path}")
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="edit")
def edit_app(cfg: DictConfig) -> None:
    report_errors(in_own_folder(run_edit))(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="attention")
def attention_app(cfg: DictConfig) -> None:
    report_errors(in_own_folder(run_attention))(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="edit_bench")
def edit_bench_app(cfg: DictConfig) -> None:
    from nulltext.editing.benchmark import run_edit_bench

    report_errors(in_own_folder(run_edit_bench))(cfg)
