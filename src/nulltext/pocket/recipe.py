"""The pocket training recipe (``conf/train_pocket*.yaml``): its settings checked, its models built,
and the seeding rules that make a resumed run the same as an uninterrupted one."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from nulltext.models import CLIP_CONTEXT_LENGTH, cache_folder, resolve_device
from nulltext.pocket.leak import empty_start_settings
from nulltext.validation import SettingError

PHASES = ("vae", "decoder", "unet")
LONGEST_CAPTION = 31  # tokens of a three-object template caption with the longest background, BOS and EOS
# Settings a resumed run may change: how it runs, not what it trains. unet_train.steps may grow or
# shrink a run (it moves the end of the cosine schedule: recorded per session in training.json).
RUN_CONTROL = (
    "resume", "max_minutes", "finish_on_budget", "checkpoint_every", "log_every", "stop_at", "threads", "device",
    "output_dir", "run_dir", "run_name", "save_dtype", "export_only", "unet_train.steps",
)


def resolve_path(path: str) -> Path:
    """Relative paths are relative to the directory the command was started from."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(os.getcwd()) / p


def run_folder(cfg: DictConfig) -> Path:
    """Where a run keeps its checkpoint and curves: ``run_dir`` when given, else
    ``<nulltext cache>/pocket/<run_name>`` (:func:`nulltext.models.cache_folder`), outside the work
    tree, so the same command resumes the run from any clone of the repository."""
    if cfg.get("run_dir"):
        return resolve_path(cfg.run_dir)
    return cache_folder() / "pocket" / str(cfg.run_name)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Settings of ``current`` that differ from a checkpoint's ``saved`` ones (run control left out):
    ``{key: (saved, current)}``."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in RUN_CONTROL and a.get(k) != b.get(k)}


def step_generator(seed: int, phase: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one training step: depends on (seed, phase, step) only (resume-exact)."""
    code = (int(seed) * 1_000_003 + PHASES.index(phase) * 100_000_019 + int(step) * 7919) % (2**62)
    return torch.Generator(device=device).manual_seed(code)


def data_seed(seed: int, phase: str, step: int) -> int:
    return (int(seed) * 10_000_019 + PHASES.index(phase) * 1_000_000_007 + int(step)) % (2**62)


def lr_at(step: int, total: int, base: float, warmup: int, final_fraction: float = 0.05) -> float:
    """Linear warm-up then cosine decay to ``final_fraction * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_models(cfg: DictConfig) -> dict[str, torch.nn.Module]:
    torch.manual_seed(cfg.seed)
    m = OmegaConf.to_container(cfg.model, resolve=True)
    vae = AutoencoderKL(**m["vae"], sample_size=cfg.resolution)
    factor = 2 ** (len(m["vae"]["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(**m["unet"], sample_size=cfg.resolution // factor)
    text = CLIPTextModel(CLIPTextConfig(**m["text_encoder"], max_position_embeddings=CLIP_CONTEXT_LENGTH))
    if unet.config.cross_attention_dim != text.config.hidden_size:
        raise ValueError("model.unet.cross_attention_dim must equal model.text_encoder.hidden_size")
    return {"vae": vae, "unet": unet, "text_encoder": text}


def check_config(cfg: DictConfig) -> None:
    """Every setting of the recipe, checked before any model is built (one SettingError line each)."""
    from nulltext.validation import (
        check_bool, check_choice, check_float, check_int, check_multiple, check_positive, check_probability, check_seed,
    )

    v, u = cfg.vae_train, cfg.unet_train
    check_seed("seed", cfg.seed)
    if not cfg.get("run_dir") and (not isinstance(cfg.get("run_name"), str) or not cfg.run_name or "/" in cfg.run_name):
        raise SettingError(f"run_name={cfg.get('run_name')!r} is not allowed: a folder name (no '/') for the run's checkpoints")
    resolve_device(cfg.device, "device")
    for name in ("bf16", "resume", "finish_on_budget", "export_only"):
        check_bool(name, cfg.get(name, False))
    if cfg.threads is not None:
        check_int("threads", cfg.threads, 1)
    check_multiple("resolution", cfg.resolution, 2 ** (len(cfg.model.vae.block_out_channels) - 1))
    if cfg.max_minutes is not None:
        check_positive("max_minutes", cfg.max_minutes)
    check_int("checkpoint_every", cfg.checkpoint_every, 0)  # 0: only when stopping
    check_int("log_every", cfg.log_every, 1)
    check_choice("save_dtype", cfg.save_dtype, ("float16", "float32"))
    for phase, section in (("vae_train", v), ("unet_train", u)):
        check_int(f"{phase}.steps", section.steps, 0)  # 0 skips the phase
        check_int(f"{phase}.batch_size", section.batch_size, 1)
        check_float(f"{phase}.lr", section.lr, 0.0)  # 0 trains nothing: the exactness tests of init_from use it
        check_int(f"{phase}.warmup", section.warmup, 0)
        check_float(f"{phase}.weight_decay", section.weight_decay, 0.0)
        check_positive(f"{phase}.grad_clip", section.grad_clip)
    check_int("vae_train.decoder_steps", v.decoder_steps, 0)  # 0: no decoder fine-tune
    check_positive("vae_train.decoder_lr", v.decoder_lr)
    check_float("vae_train.kl_weight", v.kl_weight, 0.0)
    check_float("vae_train.edge_weight", v.edge_weight, 0.0)
    fractions = check_probability("vae_train.photo_fraction", v.photo_fraction) + check_probability("vae_train.noise_fraction", v.noise_fraction)
    if fractions > 1:
        raise SettingError(f"vae_train.photo_fraction + vae_train.noise_fraction = {fractions} is not allowed: at most 1 (the rest are scenes)")
    check_int("vae_train.photo_source_resolution", v.photo_source_resolution, 1)
    check_float("vae_train.photo_min_crop", v.photo_min_crop, 0.0, 1.0, strict_minimum=True)
    check_float("unet_train.text_lr_scale", u.text_lr_scale, 0.0)
    check_probability("unet_train.caption_dropout", u.caption_dropout)
    check_probability("unet_train.ema_decay", u.ema_decay)
    check_int("unet_train.scale_batches", u.scale_batches, 1)
    check_float("grounding.weight", cfg.grounding.weight, 0.0)
    places = OmegaConf.to_container(cfg.grounding.places) if OmegaConf.is_list(cfg.grounding.places) else cfg.grounding.places
    if not isinstance(places, list) or not places or any(p not in ("down", "mid", "up") for p in places):
        raise SettingError(f"grounding.places={places!r} is not allowed: a non-empty list of down, mid, up")
    check_float("grounding.cell_threshold", cfg.grounding.cell_threshold, 0.0, 1.0)
    check_float("padding.attention_weight", cfg.padding.attention_weight, 0.0)
    check_float("padding.match_weight", cfg.padding.match_weight, 0.0)
    weight, low, high = empty_start_settings(cfg.padding)
    check_float("padding.empty_start_weight", weight, 0.0)
    high = check_float("padding.empty_start_max", high, 0.01, 0.999)
    check_float("padding.empty_start_min", low, 0.0, high)
    check_int("padding.context_length", cfg.padding.context_length, LONGEST_CAPTION, CLIP_CONTEXT_LENGTH)
