"""Inversion artifacts: ``<id>.safetensors`` (tensors) plus ``<id>.json`` (everything else).

An artifact holds what reconstruction needs -- z_T, the per-step (or shared) embeddings, and for
methods with a sampler of their own its name, settings and tensors (``extras.<name>``) -- and the
settings that made it, so ``nulltext reconstruct`` or :func:`load_artifact` reproduces the
reconstruction exactly.

Both files are checked when read (one line naming the file): the JSON records the sha256 of the
``.safetensors`` file (``tensors_sha256``) and of its own content (:func:`nulltext.io.read_json`);
the tensors must be finite and of consistent shapes, and :func:`check_fits` checks them against
the model and sampler that will use them. Artifacts written before the checksums (format 1) are
read after a warning line.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from nulltext.diffusion import Diffusion
from nulltext.errors import FileError
from nulltext.io import NUMBER, atomic_write, atomic_write_json, check_fields, read_json
from nulltext.methods.base import Inversion

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the JSON records tensors_sha256 and its own sha256
EXTRAS = "extras."  # prefix of a method's own tensors in the safetensors file
REMEDY = "re-create it: run the command that wrote it again with the same hydra.run.dir (finished images are reused, this one is recomputed)"


def invalidate_artifact(stem: str | Path) -> None:
    """Remove an artifact's JSON, its completion marker, before any of its files is rewritten: a
    process killed while rewriting then leaves no old JSON beside new tensors (or images)."""
    Path(stem).with_suffix(".json").unlink(missing_ok=True)


def save_artifact(stem: str | Path, inversion: Inversion, metadata: dict) -> Path:
    """Write one image's inversion (a batch of one). The JSON marks completeness: an old one is
    removed first (:func:`invalidate_artifact`) and the new one is written last."""
    stem = Path(stem)
    invalidate_artifact(stem)
    tensors = {"z_T": inversion.z_T[0]}
    if inversion.uncond is not None:
        tensors["uncond"] = inversion.uncond[0]
        tensors["cond"] = inversion.cond[0]
    tensors.update({EXTRAS + k: v[0] for k, v in inversion.extras.items()})
    # clone: safetensors refuses tensors that share storage (negative-prompt uses one for both).
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    data = save_tensors(tensors)
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: tmp.write_bytes(data))
    record = {
        "format_version": FORMAT_VERSION,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "prompt": inversion.prompts[0],
        "guidance_scale": inversion.guidance_scale,
        "iterations": inversion.iterations[0],
        "sampler": {"method": inversion.method, "settings": inversion.settings},
        **metadata,
    }
    return atomic_write_json(stem.with_suffix(".json"), record)


def artifact_files(path: str | Path) -> tuple[Path, Path]:
    """(tensors, record) of the artifact ``path`` names: either file, or the stem."""
    stem = Path(path)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def load_artifact(path: str | Path) -> tuple[Inversion, dict]:
    """Read an artifact written by :func:`save_artifact`, checked; ``path`` may name either file or the stem.

    A :class:`FileError` naming the file when either file is missing or damaged: the record's
    fields and checksums, the tensors' names, dtypes, shapes (z_T [C, h, w]; uncond and cond
    [S or 1, L, D] alike; a method's extras end in z_T's shape) and finite values.
    """
    tensors_file, record_file = artifact_files(path)
    if not tensors_file.is_file() and not record_file.is_file():
        raise FileError(f"artifact {path} not found: give <run>/inversions/<id>.safetensors of a finished run")
    if not tensors_file.is_file():
        raise FileError(f"artifact {path}: its tensors {tensors_file} are missing: {REMEDY}")
    if not record_file.is_file():
        raise FileError(f"artifact {path}: its record {record_file} is missing (an image whose run was stopped has none): {REMEDY}")
    record = read_json(record_file, REMEDY, lambda old: old["format_version"] < 2, format_version=(int,), prompt=(str,),
                       guidance_scale=NUMBER, iterations=(int,), sampler=(dict,))
    check_fields(record["sampler"], record_file, REMEDY, method=(str, type(None)), settings=(dict,))
    check_fields(record, record_file, REMEDY, tensors_sha256=(str,) if record["format_version"] >= 2 else (str, type(None)))
    data = tensors_file.read_bytes()
    if record.get("tensors_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise FileError(f"{tensors_file} is damaged (its bytes do not match the checksum in {record_file.name}): {REMEDY}")
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors' own error type for a bad header or truncated data
        raise FileError(f"{tensors_file} is damaged (not a safetensors file: {' '.join(str(error).split())[:120]}): {REMEDY}") from None
    _check_tensors(tensors, tensors_file)
    with_batch = {k: v.unsqueeze(0) for k, v in tensors.items()}
    inversion = Inversion(
        z_T=with_batch["z_T"],
        uncond=with_batch.get("uncond"),
        cond=with_batch.get("cond"),
        prompts=[record["prompt"]],
        guidance_scale=record["guidance_scale"],
        iterations=[record["iterations"]],
        method=record["sampler"]["method"],
        settings=record["sampler"]["settings"],
        extras={k[len(EXTRAS) :]: v for k, v in with_batch.items() if k.startswith(EXTRAS)},
    )
    return inversion, record


def _check_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    def damaged(what: str) -> FileError:
        return FileError(f"{file} is damaged ({what}): {REMEDY}")

    unknown = sorted(k for k in tensors if k not in ("z_T", "uncond", "cond") and not k.startswith(EXTRAS))
    if "z_T" not in tensors or unknown or ("uncond" in tensors) != ("cond" in tensors):
        raise damaged(f"tensors {sorted(tensors)}; expected z_T, uncond and cond together, and extras.<name>")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise damaged(f"{name} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise damaged(f"{name} has {int((~torch.isfinite(tensor)).sum())} values that are not finite")
    z = tensors["z_T"]
    if z.dim() != 3:
        raise damaged(f"z_T has shape {list(z.shape)}, not [channels, height, width]")
    if "uncond" in tensors:
        uncond, cond = tensors["uncond"], tensors["cond"]
        if uncond.dim() != 3 or cond.dim() != 3 or uncond.shape[1:] != cond.shape[1:]:
            raise damaged(f"uncond {list(uncond.shape)} and cond {list(cond.shape)} are not both [steps or 1, tokens, width]")
    for name, tensor in tensors.items():
        if name.startswith(EXTRAS) and tensor.shape[-3:] != z.shape:
            raise damaged(f"{name} has shape {list(tensor.shape)}, which does not end in z_T's {list(z.shape)}")


def check_fits(inversion: Inversion, diffusion: Diffusion, file: str | Path, which: str = "the model and sampler") -> None:
    """The artifact's tensors fit the model and sampler that will use them (``which``: for the
    message): z_T's channels and sides (multiples of the UNet's downsampling), the embeddings'
    token count and width, one embedding per sampling step or one for all. A :class:`FileError`
    naming the file otherwise."""
    denoiser = diffusion.family.denoiser.config
    channels = diffusion.pipe.vae.config.latent_channels
    # A UNet halves the sides once per level; a transformer cuts them into patches.
    blocks = denoiser.get("block_out_channels")
    factor = 2 ** (len(blocks) - 1) if blocks else denoiser.get("patch_size") or 1
    # Every family's context shape (tokens, width; a pooled row included) is that of its empty prompt.
    with torch.no_grad():
        tokens, width = diffusion.family.null_text().shape[-2:]
    steps = diffusion.schedule.num_steps
    c, h, w = inversion.z_T.shape[1:]
    if c != channels or h % factor or w % factor:
        raise FileError(
            f"{file} does not fit {which}: z_T is [{c}, {h}, {w}], the model needs {channels} channels and sides that are multiples of {factor}"
        )
    for name in ("uncond", "cond"):
        tensor = getattr(inversion, name)
        if tensor is not None and (tensor.shape[1] not in (1, steps) or tuple(tensor.shape[2:]) != (tokens, width)):
            raise FileError(
                f"{file} does not fit {which}: {name} is {list(tensor.shape[1:])}, the model and sampler need "
                f"[{steps} or 1, {tokens}, {width}] ({steps} steps, {tokens} tokens of width {width})"
            )


def open_artifact(path: str | Path, device: torch.device | None = None, model=None, sampler=None) -> tuple[Inversion, dict, Diffusion]:
    """An artifact (:func:`load_artifact`) with the model and sampler it records, loaded and checked
    against its tensors (:func:`check_fits`).

    ``model``, ``sampler``: configs to use instead of the recorded ones (e.g. the same model moved to
    another folder, another guidance scale); they must fit the tensors, and a warning line says
    that they replace the recorded ones. The returned record names the ones used.
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from nulltext.errors import user_error

    inversion, record = load_artifact(path)
    _, record_file = artifact_files(path)
    missing = [k for k in ("model_config", "diffusion_config") if k not in record]
    if missing:
        raise FileError(f"{record_file} does not record {' and '.join(missing)}: re-create the artifact with `nulltext` (the runner writes them)")
    check_fields(record, record_file, REMEDY, model_config=(dict,), diffusion_config=(dict,))
    replaced = {}
    for key, name, given in (("model_config", "model", model), ("diffusion_config", "sampler", sampler)):
        given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else given
        if given is not None and given != record[key]:
            replaced[name] = sorted(k for k in {*given, *record[key]} if given.get(k) != record[key].get(k))
            record = {**record, key: given}
    try:
        pipe = instantiate(record["model_config"])
        diffusion = instantiate(record["diffusion_config"], pipe=pipe.to(device) if device is not None else pipe, resolution=record.get("resolution"))
    except Exception as error:
        if user_error(error) is not None:
            raise
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:160]
        raise FileError(f"{record_file} is damaged (its model or sampler cannot be built: {reason}): {REMEDY}") from None
    check_fits(inversion, diffusion, record_file, " and ".join(f"the {name} given" for name in replaced) or "its own model and sampler")
    for name, keys in replaced.items():
        log.warning("%s records another %s (differing in %s): using the one given; the result is not the artifact's own",
                    record_file, name, ", ".join(keys))
    return inversion, record, diffusion
