"""Loading Stable Diffusion pipelines (hub id or local folder) and building random-init ones.

Every pipeline leaves here frozen (``requires_grad_(False)``, eval mode) in float32: inversion
optimises embeddings only, and the official code's unfrozen UNet costs ~3.4 GB of weight gradients
for nothing (ALGORITHM.md section 4).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from nulltext.errors import ModelUnavailableError, UnknownNameError
from nulltext.io import atomic_write_text, check_fields
from nulltext.validation import SettingError

CLIP_CONTEXT_LENGTH = 77
# The SD v1 scheduler settings (ALGORITHM.md section 1); SD pipelines force steps_offset=1.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the CLIP tokenizer vocabulary comes from open_clip_torch, which is not installed: "
            "run `pip install open_clip_torch==3.3.0`"
        )
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer(cache_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """The real CLIP ViT-L/14 tokenizer (SD v1 token ids), built offline from open_clip's BPE merges.

    The vocabulary is OpenAI's rule: 256 byte symbols, the same with ``</w>``, one entry per merge,
    then the two special tokens. Written once to a cache folder and loaded with ``from_pretrained``
    (transformers 5 silently ignores ``vocab_file=`` keywords).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(cache_dir or os.environ.get("NULLTEXT_CACHE", Path.home() / ".cache" / "nulltext")) / "clip-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        lines = gzip.open(_clip_bpe_path()).read().decode("utf-8").split("\n")
        merges = lines[1 : 49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}))
        atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        # SD v1 pads with <|endoftext|>; the config file is written last so it marks a complete folder.
        config = {"model_max_length": CLIP_CONTEXT_LENGTH, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_CONTEXT_LENGTH)


def freeze(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_random_pipeline(
    unet: dict,
    vae: dict,
    text_encoder: dict,
    scheduler: dict | None = None,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights, built from component configs and a seed.

    Same code paths and per-call cost as a real SD model of the same shape (used by tests and GPU
    benchmarks); its pictures are noise.
    """
    # Plain containers: Hydra passes ListConfig values, which save_pretrained cannot serialise.
    unet, vae, text_encoder = (OmegaConf.to_container(OmegaConf.create(c)) for c in (unet, vae, text_encoder))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**text_encoder)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **(scheduler or {})}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return freeze(pipe)


def pocket_path() -> str:
    """Absolute path of ``models/pocket`` in the repository that holds this package (src layout),
    or ``$NULLTEXT_POCKET`` when set."""
    override = os.environ.get("NULLTEXT_POCKET")
    if override:
        return str(Path(override).expanduser().resolve())
    return str(Path(__file__).resolve().parents[2] / "models" / "pocket")


def pocket_folder(path: str | None = None) -> Path:
    """The pocket model's folder (``path``, else :func:`pocket_path`); a one-line error when it is not there."""
    folder = Path(path).expanduser() if path else Path(pocket_path())
    if not (folder / "model_index.json").exists():
        raise ModelUnavailableError(
            f"the pocket model is not at {folder}: train it with `python scripts/train_pocket_model.py` "
            "(GPU) or `--config-name train_pocket_cpu` (CPU stand-in), or set NULLTEXT_POCKET"
        )
    return folder


def load_pipeline(path: str, revision: str | None = None, local_files_only: bool | None = None) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline in float32 from a hub id or a local ``save_pretrained`` folder.

    Offline (``HF_HUB_OFFLINE=1``, or no network) a hub id works only if the weights are already in
    the Hugging Face cache; otherwise one clear error says what to do.
    """
    local = _local_folder(path)
    kwargs = {"safety_checker": None, "requires_safety_checker": False, "dtype": torch.float32}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    # Loading bars would bury the results table (they are per component, and jobs load often).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if local is not None:
        # Read first, so that a damaged folder is named (diffusers' errors do not all say which file).
        _read_config(local / "model_index.json", path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(local) if local else path, revision=revision, **kwargs)
    except Exception as error:
        if local is not None:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise ModelUnavailableError(f"cannot load the model folder {local} ({reason}): its files are damaged or incomplete; re-create it with save_pretrained") from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        raise _unavailable(path, error) from None
    return freeze(pipe)


def _local_folder(path: str) -> Path | None:
    """The pipeline folder ``path`` names, or None for a hub id; one-line errors for anything else."""
    if not isinstance(path, str) or not path:
        raise SettingError(f"model.path={path!r} is not allowed: a hub id like CompVis/stable-diffusion-v1-4 or a local pipeline folder")
    local = Path(path).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise ModelUnavailableError(
            f"model folder {local} has no model_index.json: give a folder written by "
            "StableDiffusionPipeline.save_pretrained, or a hub id"
        )
    if path.count("/") != 1 and not local.exists():
        raise UnknownNameError(
            f"unknown model {path!r}: give a hub id like CompVis/stable-diffusion-v1-4, a local pipeline folder, "
            "or one of the model configs (model=tiny, sd14, sd15, sd21_base)"
        )
    return local if local.exists() else None


def _unavailable(path: str, error: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load model {path!r} ({type(error).__name__}): its weights are not in the local Hugging Face "
        "cache and the hub cannot be reached; download it once with network access "
        f"(`hf download {path}`) or pass model.path=<local pipeline folder>"
    )


def resolve_device(name: str | None, setting: str = "device") -> torch.device:
    """A device name as configs and command lines give it: ``auto`` (or None) is CUDA when present, else the CPU.

    Other names are torch's (``cpu``, ``cuda``, ``cuda:1``, ``mps``); anything else is a
    :class:`SettingError` naming ``setting``.
    """
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise SettingError(f"{setting}={name!r} is not allowed: auto, cpu, cuda, cuda:<index> or mps") from None


def pipeline_resolution(pipe: StableDiffusionPipeline) -> int:
    """Pixel resolution the pipeline was trained at: latent size times the VAE's downsampling."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@dataclass(frozen=True)
class ModelShape:
    """What settings must fit in a model, known from its config files before any weights load."""

    vae_factor: int  # the VAE's downsampling: image sides must be multiples of it
    resolution: int  # the image side it was trained at (latent side times vae_factor)
    max_steps: int  # the most sampling steps: training timesteps less the offset of the first one


def _shape(unet: Mapping[str, Any], vae: Mapping[str, Any], scheduler: Mapping[str, Any]) -> ModelShape:
    # diffusers' rule (StableDiffusionPipeline.vae_scale_factor): one halving per VAE level but the last.
    factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
    max_steps = int(scheduler.get("num_train_timesteps", 1000)) - int(scheduler.get("steps_offset", 0))
    return ModelShape(factor, int(unet.get("sample_size") or 64) * factor, max_steps)


def model_shape(model: Mapping[str, Any]) -> ModelShape | None:
    """The :class:`ModelShape` of a ``model`` config node, from its settings or its folder's JSON files.

    Random-init configs carry their component configs; a local folder (and pocket) has
    ``unet/config.json`` etc.; a hub id's config files come from the Hugging Face cache (or the hub):
    small files, no weights. None for a constructor nulltext does not know (its shape is then read
    from the loaded pipeline, :func:`pipeline_shape`).
    """
    target = model.get("_target_")
    if target == "nulltext.models.build_random_pipeline":
        return _shape(model["unet"], model["vae"], {**SD_SCHEDULER_CONFIG, **(model.get("scheduler") or {})})
    if target == "nulltext.pocket.load_pocket":
        return _folder_shape(str(pocket_folder(model.get("path"))), None)
    if target == "nulltext.models.load_pipeline":
        return _folder_shape(model.get("path"), model.get("revision"))
    return None


# The fields of a model folder's config files that :func:`_shape` reads, with their JSON types.
SHAPE_FIELDS = {
    "unet/config.json": {"sample_size": (int, type(None))},
    "vae/config.json": {"block_out_channels": (list, type(None))},
    "scheduler/scheduler_config.json": {"num_train_timesteps": (int, type(None)), "steps_offset": (int, type(None))},
}


def _folder_shape(path: str, revision: str | None) -> ModelShape:
    local = _local_folder(path)
    files = {}
    for name in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        if local is None:
            from huggingface_hub import hf_hub_download

            try:
                file = hf_hub_download(path, name, revision=revision)
            except (OSError, ValueError) as error:  # not cached offline, unknown repo, no network
                raise _unavailable(path, error) from None
        else:
            file = local / name
        files[name] = check_fields(_read_config(Path(file), path), file, "re-create the model folder", **SHAPE_FIELDS[name])
    return _shape(*files.values())


def _read_config(file: Path, model: str) -> dict:
    """A JSON config file of a model folder (or the hub's cache), as a dict; one line naming it when missing or damaged."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot read {file} of model {model!r} ({type(error).__name__}): the folder is damaged or incomplete; re-create it") from None
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{file} of model {model!r} is damaged (a JSON {type(config).__name__}, not an object): re-create the folder")
    return config


def pipeline_shape(pipe: StableDiffusionPipeline) -> ModelShape:
    """The :class:`ModelShape` of a loaded pipeline."""
    config = pipe.scheduler.config
    return ModelShape(pipe.vae_scale_factor, pipeline_resolution(pipe), config.num_train_timesteps - config.get("steps_offset", 0))
