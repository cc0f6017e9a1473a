"""The experiment runner: a LightningModule that applies one inversion method to a dataset.

``trainer.test`` drives it (Lightning's test loop runs under ``torch.no_grad``; inversion needs
gradients, so ``test_step`` re-enables them and the Trainer must be built with
``inference_mode=False``). Per image it writes a PNG (input | VAE | reconstruction) and an
inversion artifact, logs PSNR/LPIPS/SSIM, and at the end writes ``metrics.json`` atomically.

Cost per image, measured (:mod:`nulltext.cost`), never computed from a formula:

- ``seconds``: wall time of the method's ``invert`` over the batch / batch size, without the
  evaluations made for the method's own curve;
- ``inversion_unet_evaluations`` / ``reconstruction_unet_evaluations``: UNet rows counted by a hook
  on the UNet during ``invert`` (curve evaluations excluded) and during the reconstruction, divided
  by the batch size. A batch of B rows is B evaluations, guidance's [uncond; cond] batch 2 per
  image. When a method drops finished images from its batch (null-text's early stop) the count of
  a batch of several images is their mean; with ``data.batch_size=1`` it is the image's own;
- ``peak_memory_mib``: peak memory of the batch's ``invert`` (:class:`nulltext.cost.PeakMemory`:
  CUDA tensor memory, or the process's peak RSS on CPU; ``peak_memory`` in metrics.json says which).

:class:`ImageProgressBar` is the run's progress bar (images done, elapsed, time left), shown
only where someone watches: :func:`progress_bar_settings` decides.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from PIL import Image

from nulltext.artifacts import invalidate_artifact, load_artifact, save_artifact
from nulltext.cost import PeakMemory, UNetCounter, peak_memory_definition
from nulltext.diffusion import Diffusion
from nulltext.errors import FileError, NulltextError
from nulltext.folders import folder_override
from nulltext.io import atomic_write, atomic_write_json
from nulltext.methods import Inversion, InversionMethod, image_seed
from nulltext.metrics import SSIM_SPEC, ImageScores, load_lpips, psnr_per_image, score_uint8
from nulltext.provenance import provenance
from nulltext.reconstruction import Reconstruction, latent_errors, reconstruct, to_uint8

log = logging.getLogger(__name__)


# Per-image values whose mean over the run's images metrics.json records as ``<key>_mean``.
MEAN_KEYS = (
    "psnr", "lpips", "ssim", "vae_psnr", "seconds", "iterations",
    "inversion_unet_evaluations", "reconstruction_unet_evaluations", "peak_memory_mib",
)
UNET_EVALUATIONS = (
    "UNet batch rows per image, counted by a hook on the UNet (guidance's [uncond; cond] call = 2), "
    "during the inversion (its curve evaluations excluded) and during the reconstruction"
)


def image_row(*images: torch.Tensor) -> Image.Image:
    """uint8 [3,H,W] tensors side by side as one PIL image."""
    return Image.fromarray(torch.cat(images, dim=2).permute(1, 2, 0).cpu().numpy())


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def standard_normal_log_likelihood(z: torch.Tensor) -> float:
    """Mean log-density per dimension of ``z`` under N(0, I), in nats (paper Fig. 9's z_T likelihood)."""
    return (-0.5 * (z.double().pow(2) + math.log(2 * math.pi))).mean().item()


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mean_of(results: list[dict], key: str) -> float:
    """Mean of ``key`` over the results that have a value for it (NaN if none do)."""
    return mean_or_nan([r[key] for r in results if r.get(key) is not None])


def per_image(count: int, batch_size: int) -> int | float:
    """A batch's count shared out per image, as an int when it divides evenly."""
    share = count / batch_size
    return int(share) if share.is_integer() else share


# The settings that make a run folder's results one run's, named as on the command line: those that
# decide an image's result (the resume hash's) and which images the data are.
RUN_SETTINGS = ("model", "diffusion", "inversion", "data.dataset", "data.resolution", "seed", "lpips_net")


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """A nested config as {dotted key: value} (a list is one value)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def settings_differences(ours: dict, theirs: dict) -> list[str]:
    """The :data:`RUN_SETTINGS` in which two composed configs differ, as 'key: theirs there, ours here'."""

    def pick(config: dict) -> dict[str, Any]:
        found = {}
        for name in RUN_SETTINGS:
            node = config
            for part in name.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            found.update(_leaves(node, name))
        return found

    a, b = pick(ours), pick(theirs)
    differing = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    # Another constructor (inversion=ddim instead of null_text): its other settings differ as a matter of course.
    replaced = [k.removesuffix("._target_") + "." for k in differing if k.endswith("._target_")]
    return [f"{k}: {b.get(k)!r} there, {a.get(k)!r} here" for k in differing if k.endswith("._target_") or not k.startswith(tuple(replaced))]


def check_same_settings(output_dir: Path, config: dict) -> None:
    """Refuse a run into a folder whose finished images were made with other settings (``config`` is
    the composed one): metrics.json would cover this run's images, and inversions/ and images/ a mix
    of both runs'."""
    for path in sorted((output_dir / "inversions").glob("*.json")):
        try:
            theirs = json.loads(path.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged artifact: reported where the run reads it
        differences = settings_differences(config, theirs or {})
        if differences:
            more = f"; and {len(differences) - 3} more" if len(differences) > 3 else ""
            raise NulltextError(
                f"{output_dir} holds finished images made with other settings ({'; '.join(differences[:3])}{more}; "
                f"see {path.name}): give another {folder_override()}=<folder>, or delete the folder to recompute them"
            )


class ImageProgressBar(TQDMProgressBar):
    """Lightning's test progress bar, counting images instead of batches, on stderr.

    A batch of ``data.batch_size`` images advances it by that many at once (failed and reused
    images count as done); the postfix names the last image. Elapsed time and the estimate of
    the time left are tqdm's. The bar is closed in ``on_test_end``, before ``trainer.test``
    returns, so whatever the caller prints afterwards (the summary table) stays last.
    """

    def __init__(self) -> None:
        super().__init__(leave=True)
        self._images_total: int | None = None
        self._images_done = 0

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(
            desc="Inverting",
            total=self._images_total,
            unit="image",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            # Lightning's format with tqdm's rate_fmt, which reads "12.3s/image" for slow images.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        # The sampler holds this process's images (its shard under DDP).
        self._images_total = sum(len(loader.sampler) for loader in loaders)
        self._images_done = 0
        super().on_test_start(trainer, pl_module)

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        """Keep the image total set in on_test_start (the parent would reset it to batches)."""

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        ids = [*batch["ids"], *(f["id"] for f in batch["failures"])]
        self._images_done += len(ids)
        bar = self.test_progress_bar
        if not bar.disable:
            if ids:
                bar.set_postfix_str(f"image {ids[-1]}", refresh=False)
            bar.n = self._images_done
            bar.refresh()


def progress_bar_settings(setting: bool | None, interactive: bool) -> dict[str, Any]:
    """Trainer keyword arguments for the progress bar.

    ``setting`` is ``trainer.enable_progress_bar``: ``None`` (the default) shows an
    :class:`ImageProgressBar` only when ``interactive`` (pass ``sys.stderr.isatty()``: under
    SLURM, in CI or with output redirected, a bar would only fill the log with carriage
    returns); ``True`` / ``False`` force it on / off.
    """
    enabled = interactive if setting is None else bool(setting)
    return {"enable_progress_bar": enabled, "callbacks": [ImageProgressBar()] if enabled else []}


class InversionModule(L.LightningModule):
    """Runs ``method`` over the test dataloader's batches and records everything per image.

    Args:
        diffusion: the pipeline wrapper (its modules become submodules, so Lightning places them).
        method: the inversion method.
        output_dir: run directory; gets ``metrics.json``, ``images/`` and ``inversions/``.
        seed: run seed; per-image random draws use ``image_seed(seed, id)``.
        lpips_net: LPIPS backbone ("alex" as in the literature).
        record: extra settings stored in every artifact and in metrics.json (model config, names).
    """

    def __init__(
        self,
        diffusion: Diffusion,
        method: InversionMethod,
        output_dir: str | Path,
        seed: int = 0,
        lpips_net: str = "alex",
        record: dict | None = None,
    ):
        super().__init__()
        self.diffusion = diffusion
        self.components = torch.nn.ModuleDict(diffusion.components)
        self.method = method
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.lpips_net = lpips_net
        self.record = dict(record or {})
        self.results: list[dict] = []
        self.metrics: dict | None = None

    def on_test_start(self) -> None:
        if self.trainer.is_global_zero:
            # metrics.json exists only for a finished run: a rerun killed half-way must not leave
            # the previous run's summary beside some recomputed images.
            (self.output_dir / "metrics.json").unlink(missing_ok=True)
        self.lpips, self.lpips_spec = load_lpips(self.lpips_net, device=self.device)
        datamodule = self.trainer.datamodule
        self.method.prepare(datamodule.captions if datamodule is not None else [])

    @functools.cached_property
    def config_hash(self) -> str:
        """Identifies everything that determines an image's result, for resuming interrupted runs."""
        key = {k: self.record.get(k) for k in ("model_config", "diffusion_config", "resolution")}
        key.update(method=self.method.config(), seed=self.seed, lpips=self.lpips_net)
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def finished_result(self, image_id: str, caption: str) -> dict | None:
        """The stored result of an image already inverted with this exact configuration, if any."""
        path = self.output_dir / "inversions" / f"{image_id}.json"
        if not path.exists():
            return None
        try:
            _, record = load_artifact(path)
        except FileError as error:
            log.warning("image %s: recomputing it, its stored artifact cannot be used: %s", image_id, error)
            return None
        result = record.get("result")
        if record.get("config_hash") != self.config_hash or not isinstance(result, dict) or result.get("caption") != caption:
            return None
        return result

    def artifact_metadata(self, image_id: str, seed: int, result: dict) -> dict:
        d = self.diffusion
        return {
            "id": image_id,
            "seed": seed,
            "config_hash": self.config_hash,
            "method": self.method.config(),
            "num_inference_steps": d.schedule.num_steps,
            "inversion_timestep": d.inversion_timestep,
            # Without diffusers' bookkeeping keys: _use_default_values is a set, listed in a
            # different order by each process, so identical runs would differ.
            "scheduler": {k: v for k, v in d.pipe.scheduler.config.items() if not k.startswith("_")},
            **self.record,
            **provenance(),
            "result": result,
        }

    def test_step(self, batch: dict, batch_idx: int) -> None:
        first = len(self.results)
        for failure in batch["failures"]:
            log.error("image %s failed: %s", failure["id"], failure["error"])
            self.results.append({"id": failure["id"], "status": "failed", "error": failure["error"]})
        todo = []
        for b, (image_id, caption) in enumerate(zip(batch["ids"], batch["captions"])):
            done = self.finished_result(image_id, caption)
            if done is None:
                todo.append(b)
            else:
                log.info("image %s: reusing the stored result (same config hash %s)", image_id, self.config_hash)
                self.results.append(done)
                self.log_image(done)
        if todo:
            log.info("inverting %s", ", ".join(batch["ids"][b] for b in todo))
            self.invert_batch([batch["ids"][b] for b in todo], [batch["captions"][b] for b in todo], batch["images"][todo])
        self.log_run_means([r for r in self.results[first:] if r["status"] == "ok"])

    def invert_batch(self, ids: list[str], captions: list[str], images: torch.Tensor) -> None:
        for image_id in ids:  # before the PNG is rewritten: see invalidate_artifact
            invalidate_artifact(self.output_dir / "inversions" / image_id)
        images = images.to(self.device)
        target = images.float() / 255
        seeds = [image_seed(self.seed, i) for i in ids]
        z0 = self.diffusion.encode_images(images)
        curves: list[list[dict]] = [[] for _ in ids]
        evaluation_seconds = 0.0

        def evaluate(inversion: Inversion, seconds: float) -> tuple[ImageScores, Reconstruction]:
            """Reconstruct and score; every evaluation is also a point of the image's curve."""
            recon = reconstruct(self.diffusion, inversion)
            scores = score_uint8(self.lpips, recon.images, images)
            for b, curve in enumerate(curves):
                point = {name: value[b].item() for name, value in scores._asdict().items()}
                curve.append({"iterations": inversion.iterations[b], "seconds": seconds, **point})
            return scores, recon

        def monitor(inversion: Inversion) -> None:
            # Evaluations are kept off the curve's time axis and the UNet count: they measure the method only.
            nonlocal evaluation_seconds
            began = time.perf_counter()
            with inversion_calls.paused():
                evaluate(inversion, (began - start - evaluation_seconds) / len(ids))
            evaluation_seconds += time.perf_counter() - began

        with UNetCounter(self.diffusion.unet) as inversion_calls, PeakMemory(self.device) as memory:
            start = time.perf_counter()
            with torch.enable_grad():
                inversion = self.method.invert(self.diffusion, z0, captions, seeds, monitor=monitor)
            seconds = (time.perf_counter() - start - evaluation_seconds) / len(ids)
        with UNetCounter(self.diffusion.unet) as reconstruction_calls:
            scores, recon = evaluate(inversion, seconds)
        psnr, lpips, ssim = scores
        vae_images = to_uint8(self.diffusion.decode(z0))
        as_float = lambda x: x.float() / 255  # noqa: E731
        vae_psnr = psnr_per_image(as_float(vae_images), target)
        extra = {
            f"psnr_w{w:g}": psnr_per_image(as_float(reconstruct(self.diffusion, inversion, w).images), target)
            for w in inversion.extra_guidance_scales
        }
        errors = None
        if inversion.pivot is not None and recon.trajectory is not None:
            errors = latent_errors(recon.trajectory, inversion.pivot)
        for b, image_id in enumerate(ids):
            result = {
                "id": image_id,
                "status": "ok",
                "caption": captions[b],
                "inversion_prompt": inversion.prompts[b],
                "psnr": psnr[b].item(),
                "lpips": lpips[b].item(),
                "ssim": ssim[b].item(),
                "vae_psnr": vae_psnr[b].item(),
                "iterations": inversion.iterations[b],
                "seconds": seconds,
                "inversion_unet_evaluations": per_image(inversion_calls.rows, len(ids)),
                "reconstruction_unet_evaluations": per_image(reconstruction_calls.rows, len(ids)),
                "peak_memory_mib": memory.mib,
                **{k: v[b].item() for k, v in extra.items()},
            }
            if inversion.uncond is not None:
                result["z_T_log_likelihood"] = standard_normal_log_likelihood(inversion.z_T[b])
            if errors is not None:
                result["latent_error"] = {"timesteps": [*self.diffusion.timesteps, 0], "mse": errors[b].tolist()}
            result["curve"] = curves[b]
            for name, curve in inversion.curves.items():
                result[name] = curve[b]
            save_png(self.output_dir / "images" / f"{image_id}.png", image_row(images[b], vae_images[b], recon.images[b]))
            # The artifact's JSON is written last: its presence marks the image as complete.
            save_artifact(self.output_dir / "inversions" / image_id, inversion.select(b), self.artifact_metadata(image_id, seeds[b], result))
            self.results.append(result)
            self.log_image(result, images[b], recon.images[b])
            log.info("image %s: PSNR %.2f dB, LPIPS %.4f, %s iterations, %.2f s", image_id, result["psnr"], result["lpips"], result["iterations"], seconds)

    def log_run_means(self, results: list[dict]) -> None:
        """``test/*``, which Lightning averages over the run (weighted by image count): from the result
        records, so that images reused on a resume count as much as recomputed ones."""
        keys = ("psnr", "lpips", "ssim", "vae_psnr", "seconds", *sorted({k for r in results for k in r if k.startswith("psnr_w")}))
        for key in keys:
            values = [float(r[key]) for r in results if key in r]
            if values:
                self.log(f"test/{key}", sum(values) / len(values), batch_size=len(values), on_epoch=True, sync_dist=True)

    def log_image(self, result: dict, image: torch.Tensor | None = None, reconstruction: torch.Tensor | None = None) -> None:
        """Per-image values to every logger (step = image index); pictures and curves to wandb (not
        for a reused result, whose pictures are already in images/)."""
        step = len([r for r in self.results if r["status"] == "ok"]) - 1
        scalars = {f"image/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=step)
        if image is None:
            return
        wandb_loggers = [lg for lg in self.loggers if type(lg).__name__ == "WandbLogger"]
        for logger in wandb_loggers:
            import wandb

            payload = {"image/reconstruction": wandb.Image(image_row(image, reconstruction), caption=f"{result['id']}: {result['caption']}")}
            if "latent_error" in result:
                curve = result["latent_error"]
                table = wandb.Table(data=list(zip(curve["timesteps"], curve["mse"])), columns=["timestep", "latent mse"])
                payload[f"latent_error/{result['id']}"] = wandb.plot.line(table, "timestep", "latent mse", title=f"latent error {result['id']}")
            logger.experiment.log(payload)

    def gathered_results(self) -> list[dict]:
        """Every rank's results once each, in dataset order (DDP pads shards by repeating images)."""
        results = self.results
        if self.trainer.world_size > 1:
            shards: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(shards, results)
            results = [r for shard in shards for r in shard]
        unique = {r["id"]: r for r in reversed(results)}
        datamodule = self.trainer.datamodule
        order = {image_id: i for i, image_id in enumerate(datamodule.ids)} if datamodule is not None else {}
        return sorted(unique.values(), key=lambda r: order.get(r["id"], len(order)))

    def on_test_epoch_end(self) -> None:
        self.results = self.gathered_results()
        ok = [r for r in self.results if r["status"] == "ok"]
        self.metrics = {
            "method": self.method.name,
            "method_config": self.method.config(),
            **self.record,
            "lpips": self.lpips_spec,
            "ssim": SSIM_SPEC,
            "unet_evaluations": UNET_EVALUATIONS,
            "peak_memory": peak_memory_definition(self.device),
            **{f"{key}_mean": mean_of(ok, key) for key in MEAN_KEYS},
            "num_images": len(ok),
            "num_failed": len(self.results) - len(ok),
            "images": self.results,
            **provenance(),
        }
        for key in sorted({k for r in ok for k in r if k.startswith("psnr_w")}):
            self.metrics[f"{key}_mean"] = mean_or_nan([r[key] for r in ok if key in r])
        if self.trainer.is_global_zero:
            atomic_write_json(self.output_dir / "metrics.json", self.metrics)
