"""Loading pipelines of every family (hub id or local folder) and building random-init ones.

Every pipeline leaves here frozen (``requires_grad_(False)``, eval mode) in float32: inversion
optimises embeddings only, and the official code's unfrozen UNet costs ~3.4 GB of weight gradients
for nothing (ALGORITHM.md section 4).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.utils import logging as transformers_logging

from nulltext.errors import ModelUnavailableError, UnknownNameError
from nulltext.families import FAMILIES, ModelShape, family_class, family_of
from nulltext.io import atomic_write_text, check_fields
from nulltext.validation import SettingError, check_choice

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


def cache_folder() -> Path:
    """nulltext's cache (outside any work tree): ``$NULLTEXT_CACHE``, else ``$XDG_CACHE_HOME/nulltext``,
    else ``~/.cache/nulltext``."""
    if os.environ.get("NULLTEXT_CACHE"):
        return Path(os.environ["NULLTEXT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "nulltext"


def clip_tokenizer(cache_dir: str | os.PathLike | None = None, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP ViT-L/14 tokenizer (SD v1 token ids), built offline from open_clip's BPE merges.

    SD v1 pads with ``<|endoftext|>``; SDXL's and SD3's second (OpenCLIP ViT-bigG) tokenizer with ``!``.

    The vocabulary is OpenAI's rule: 256 byte symbols, the same with ``</w>``, one entry per merge,
    then the two special tokens. Written once to a cache folder and loaded with ``from_pretrained``
    (transformers 5 silently ignores ``vocab_file=`` keywords).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(cache_dir or cache_folder()) / "clip-tokenizer"
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
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_CONTEXT_LENGTH, pad_token=pad_token)


# ``model.dtype``: the denoiser's weights in float32, or in half precision to halve their memory.
# Only the denoiser: the text encoders and the VAE run once per image, and the embeddings an
# inversion optimises, its optimiser and the latents stay float32
# (:meth:`nulltext.diffusion.Diffusion.denoise` casts the denoiser's inputs and output).
WEIGHT_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(dtype: str) -> torch.dtype:
    """A ``model.dtype`` setting as a torch dtype (one line for any other value)."""
    return WEIGHT_DTYPES[check_choice("model.dtype", dtype, tuple(WEIGHT_DTYPES))]


def with_denoiser_dtype(pipe: DiffusionPipeline, dtype: str) -> DiffusionPipeline:
    """The pipeline with its denoiser's weights cast to ``dtype`` (a :data:`WEIGHT_DTYPES` key)."""
    denoiser, target = family_of(pipe).denoiser, check_dtype(dtype)
    if denoiser.dtype != target:
        # diffusers' ModelMixin.to warns at any dtype cast that some modules "should be kept in float32",
        # even when the model lists none (the UNets): those without such modules are cast as plain modules.
        if denoiser._keep_in_fp32_modules:
            denoiser.to(target)
        else:
            torch.nn.Module.to(denoiser, target)
    return pipe


def freeze(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Every network of the pipeline without gradients and in eval mode; no progress bars."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain(*configs) -> list[dict | None]:
    """Component configs as plain containers: Hydra passes ListConfig values, which save_pretrained cannot serialise."""
    return [None if c is None else OmegaConf.to_container(OmegaConf.create(c)) for c in configs]


def build_random_pipeline(
    unet: dict,
    vae: dict,
    text_encoder: dict,
    scheduler: dict | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights, built from component configs and a seed.

    Same code paths and per-call cost as a real SD model of the same shape (used by tests and GPU
    benchmarks); its pictures are noise. ``dtype``: the UNet's weights (:data:`WEIGHT_DTYPES`).
    """
    check_dtype(dtype)
    unet, vae, text_encoder = _plain(unet, vae, text_encoder)
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
    return freeze(with_denoiser_dtype(pipe, dtype))


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
            "(GPU) or `--config-name train_pocket_cpu_grounded` (the CPU-trained one shipped), or set NULLTEXT_POCKET"
        )
    return folder


def load_pipeline(
    path: str, revision: str | None = None, local_files_only: bool | None = None, t5: bool = True, dtype: str = "float32"
) -> DiffusionPipeline:
    """Load a pipeline in float32 from a hub id or a local ``save_pretrained`` folder (``dtype``: the
    denoiser's weights, :data:`WEIGHT_DTYPES`).

    Its family (SD 1/2, SDXL, SD3, FLUX: :mod:`nulltext.families`) is the pipeline class its
    ``model_index.json`` names. ``t5=False`` loads SD3 without its T5 encoder (zeros take its place,
    as in StableDiffusion3Pipeline). Offline (``HF_HUB_OFFLINE=1``, or no network) a hub id works
    only if the weights are already in the Hugging Face cache; otherwise one clear error says what to do.
    """
    check_dtype(dtype)
    local = _local_folder(path)
    if local_files_only is None and local is None and not hub_reachable():
        local_files_only = True
    family = _family(path, local, revision, bool(local_files_only))
    kwargs = {"dtype": torch.float32}
    if family.name == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if not t5:
        if family.name != "sd3":
            raise SettingError(f"model.t5=false is not allowed for {path!r}: only SD3 can run without its T5 encoder")
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    # Loading bars would bury the results table (they are per component, and jobs load often).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if local is not None:
        # Read first, so that a damaged folder is named (diffusers' errors do not all say which file).
        _read_config(local / "model_index.json", path)
    try:
        pipe = family.pipeline.from_pretrained(str(local) if local else path, revision=revision, **kwargs)
    except Exception as error:
        if local is not None:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise ModelUnavailableError(f"cannot load the model folder {local} ({reason}): its files are damaged or incomplete; re-create it with save_pretrained") from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        raise _unavailable(path, error) from None
    return freeze(with_denoiser_dtype(pipe, dtype))


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all: asked once per process, one request of 5 s at most.

    Offline, huggingface_hub would retry every file with back-off for half a minute before failing;
    after a no, hub models load from the local cache only (or fail in one line at once).
    ``HF_HUB_OFFLINE=1`` answers no without asking.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # any kind of transport failure (refused, no DNS, timeout, proxy, TLS) means no answer
        return False
    return True


MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def model_configs() -> list[str]:
    """The names of the model configs (``model=<name>`` on the command line, ``load_pipeline("<name>")``)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def _local_folder(path: str) -> Path | None:
    """The pipeline folder ``path`` names, or None for a hub id; one-line errors for anything else."""
    if not isinstance(path, str) or not path:
        raise SettingError(f"model.path={path!r} is not allowed: a hub id like CompVis/stable-diffusion-v1-4 or a local pipeline folder")
    local = Path(path).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise ModelUnavailableError(
            f"model folder {local} has no model_index.json: give a folder written by a pipeline's "
            "save_pretrained (StableDiffusionPipeline, StableDiffusionXLPipeline, ...), or a hub id"
        )
    if path.count("/") != 1 and not local.exists():
        raise UnknownNameError(
            f"unknown model {path!r}: give a hub id like CompVis/stable-diffusion-v1-4, a local pipeline folder, "
            f"or one of the model configs (model={', '.join(model_configs())})"
        )
    return local if local.exists() else None


def _unavailable(path: str, error: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load model {path!r} ({type(error).__name__}): its weights are not in the local Hugging Face "
        "cache and the hub cannot be reached; download it once with network access "
        f"(`hf download {path}`) or give a local pipeline folder instead (model.path=<folder>, or load_pipeline(<folder>))"
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


def pipeline_resolution(pipe: DiffusionPipeline) -> int:
    """Pixel resolution the pipeline was trained at (latent size times the VAE's downsampling for SD)."""
    return pipeline_shape(pipe).resolution


# The random-init builders (model configs' ``_target_``) and the family each builds.
RANDOM_BUILDERS = {
    "nulltext.models.build_random_pipeline": "sd",
    "nulltext.models.build_random_xl": "sdxl",
    "nulltext.models.build_random_sd3": "sd3",
    "nulltext.models.build_random_flux": "flux",
}


def model_shape(model: Mapping[str, Any]) -> ModelShape | None:
    """The :class:`ModelShape` of a ``model`` config node, from its settings or its folder's JSON files.

    Random-init configs carry their component configs; a local folder (and pocket) has
    ``model_index.json``, ``unet/config.json`` (or ``transformer/``) etc.; a hub id's config files
    come from the Hugging Face cache (or the hub): small files, no weights. None for a constructor
    nulltext does not know (its shape is then read from the loaded pipeline, :func:`pipeline_shape`).
    """
    target = model.get("_target_")
    if target in RANDOM_BUILDERS:
        family = FAMILIES[RANDOM_BUILDERS[target]]
        # The UNet families' builders default to SD's DDIM settings; the flow ones take the whole scheduler config.
        scheduler = {**(SD_SCHEDULER_CONFIG if family.denoiser_name == "unet" else {}), **(model.get("scheduler") or {})}
        return family.shape(model[family.denoiser_name], model["vae"], scheduler)
    if target == "nulltext.pocket.load_pocket":
        return _folder_shape(str(pocket_folder(model.get("path"))), None)
    if target == "nulltext.models.load_pipeline":
        return _folder_shape(model.get("path"), model.get("revision"))
    return None


def _family(path: str, local: Path | None, revision: str | None, local_files_only: bool = False):
    """The :class:`~nulltext.families.Family` class of the pipeline folder or hub id ``path``."""
    return family_class(_config_file(path, local, "model_index.json", revision, local_files_only).get("_class_name"), repr(path))


# The fields of a model folder's config files that the families' shapes read, with their JSON types.
SHAPE_FIELDS = {
    "unet/config.json": {"sample_size": (int, type(None))},
    "vae/config.json": {"block_out_channels": (list, type(None))},
    "scheduler/scheduler_config.json": {"num_train_timesteps": (int, type(None)), "steps_offset": (int, type(None))},
}


def _config_file(path: str, local: Path | None, name: str, revision: str | None, local_files_only: bool = False) -> dict:
    """A JSON file of a pipeline folder or hub id (the Hugging Face cache's copy offline), its shape
    fields checked; one line naming it when missing or damaged."""
    if local is None:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(path, name, revision=revision, local_files_only=local_files_only))
        except (OSError, ValueError) as error:  # not cached offline, unknown repo, no network
            raise _unavailable(path, error) from None
    else:
        file = local / name
    return check_fields(_read_config(file, path), file, "re-create the model folder", **SHAPE_FIELDS.get(name, {}))


def _folder_shape(path: str, revision: str | None) -> ModelShape:
    local = _local_folder(path)
    family = _family(path, local, revision, not hub_reachable())
    names = (f"{family.denoiser_name}/config.json", "vae/config.json", "scheduler/scheduler_config.json")
    return family.shape(*(_config_file(path, local, name, revision, not hub_reachable()) for name in names))


def _read_config(file: Path, model: str) -> dict:
    """A JSON config file of a model folder (or the hub's cache), as a dict; one line naming it when missing or damaged."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot read {file} of model {model!r} ({type(error).__name__}): the folder is damaged or incomplete; re-create it") from None
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{file} of model {model!r} is damaged (a JSON {type(config).__name__}, not an object): re-create the folder")
    return config


def pipeline_shape(pipe: DiffusionPipeline) -> ModelShape:
    """The :class:`ModelShape` of a loaded pipeline."""
    family = family_of(pipe)
    return family.shape(dict(family.denoiser.config), dict(pipe.vae.config), dict(pipe.scheduler.config))


T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """A T5-style tokenizer built offline: T5's special tokens and ids (pad 0, eos 1, unk 2), a character vocabulary.

    Offline there is no T5 SentencePiece model (OFFLINE.md); random-init T5 encoders only need
    ids of the right kind. Every prompt ends with ``</s>`` and is padded with ``<pad>``, as with T5.
    """
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab = [(token, 0.0) for token in T5_SPECIAL] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_random_xl(
    unet: dict,
    vae: dict,
    text_encoder: dict,
    text_encoder_2: dict,
    scheduler: dict | None = None,
    seed: int = 0,
    force_zeros_for_empty_prompt: bool = True,
    dtype: str = "float32",
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline with random weights: CLIP-L-like and CLIP-G-like (with projection) encoders, a text_time UNet.

    The second tokenizer pads with ``!`` as SDXL's does. ``dtype``: the UNet's weights (:data:`WEIGHT_DTYPES`).
    """
    check_dtype(dtype)
    unet, vae, text_encoder, text_encoder_2 = _plain(unet, vae, text_encoder, text_encoder_2)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**unet),
        scheduler=DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **(scheduler or {})}),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    return freeze(with_denoiser_dtype(pipe, dtype))


def build_random_sd3(
    transformer: dict, vae: dict, text_encoder: dict, text_encoder_2: dict, text_encoder_3: dict | None, scheduler: dict, t5_length: int = 256, seed: int = 0
) -> StableDiffusion3Pipeline:
    """An SD3 pipeline with random weights; ``text_encoder_3=None`` builds it without T5 (zeros in its place)."""
    transformer, vae, text_encoder, text_encoder_2, text_encoder_3, scheduler = _plain(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, scheduler)
    torch.manual_seed(seed)
    tokenizer_3 = t5_tokenizer(t5_length) if text_encoder_3 is not None else None
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2)),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer_3), **text_encoder_3})) if tokenizer_3 else None,
        tokenizer_3=tokenizer_3,
    )
    return freeze(pipe)


def build_random_flux(
    transformer: dict, vae: dict, text_encoder: dict, text_encoder_2: dict, scheduler: dict, t5_length: int = 512, seed: int = 0
) -> FluxPipeline:
    """A FLUX pipeline with random weights (guidance-distilled like FLUX-dev when ``transformer.guidance_embeds``)."""
    transformer, vae, text_encoder, text_encoder_2, scheduler = _plain(transformer, vae, text_encoder, text_encoder_2, scheduler)
    torch.manual_seed(seed)
    tokenizer_2 = t5_tokenizer(t5_length)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer_2), **text_encoder_2})),
        tokenizer_2=tokenizer_2,
    )
    return freeze(pipe)
