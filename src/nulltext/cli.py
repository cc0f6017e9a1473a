"""Command line: ``nulltext [overrides]`` (invert a dataset), ``nulltext reconstruct artifact=...``,
``nulltext report <sweep dir>``, and the editing apps ``nulltext edit``, ``nulltext attention`` and
``nulltext edit_bench`` (:mod:`nulltext.editing.cli`).

Both are Hydra apps over the configs in ``conf/``. The task functions (:func:`run_inversion`,
:func:`run_reconstruction`) take a composed config and are what tests call. Each task first checks
every setting (:data:`SETTING_CHECKS`: one per app, the same code the run goes on with), so bad
input stops it with one line before any model loads.
"""

from __future__ import annotations

import logging
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nulltext.apps import CONFIG_DIR, report_errors
from nulltext.editing.benchmark import check_edit_bench
from nulltext.editing.cli import attention_app, check_attention, check_edit, edit_app, edit_bench_app
from nulltext.errors import ModelUnavailableError, NulltextError
from nulltext.folders import FolderLock, in_own_folder, resumable, stopped
from nulltext.io import check_writable_folder
from nulltext.validation import SettingError, check_choice, check_given, check_int, check_multiple, check_seed, check_text

log = logging.getLogger("nulltext")

TABLE_COLUMNS = ("method", "PSNR", "LPIPS", "SSIM", "VAE PSNR", "iters", "s/image", "UNet inv/rec", "peak MiB", "images")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of run summaries (metrics.json dictionaries)."""

    def cells(m: dict) -> tuple[str, ...]:
        failed = f" ({m['num_failed']} failed)" if m.get("num_failed") else ""
        number = lambda v, f: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
        return (
            m["method"],
            number(m.get("psnr_mean"), ".2f"),
            number(m.get("lpips_mean"), ".4f"),
            number(m.get("ssim_mean"), ".4f"),
            number(m.get("vae_psnr_mean"), ".2f"),
            number(m.get("iterations_mean"), ".0f"),
            number(m.get("seconds_mean"), ".2f"),
            f"{number(m.get('inversion_unet_evaluations_mean'), '.0f')}/{number(m.get('reconstruction_unet_evaluations_mean'), '.0f')}",
            number(m.get("peak_memory_mib_mean"), ".0f"),
            f"{m.get('num_images', 0)}{failed}",
        )

    table = [TABLE_COLUMNS, *[cells(m) for m in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{m['method']}: not applicable to {m.get('family')} models: {m['not_applicable']}" for m in rows if m.get("not_applicable")]
    return "\n".join(lines)


def choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra app (e.g. model -> "tiny")."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


@dataclass
class PreparedInversion:
    """What :func:`prepare_inversion` checked and built: everything of a run but the model's weights."""

    method: Any
    datamodule: Any
    resolution: int
    loggers: list
    trainer: L.Trainer
    family: str  # the model's (a nulltext.families.FAMILIES key)
    pipe: Any = None  # already loaded only for a model constructor whose shape its config does not tell


def check_trainer(trainer: DictConfig) -> None:
    """Lightning's accelerator, devices, strategy and precision names (Lightning would raise a traceback)."""
    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    check_choice("trainer.accelerator", trainer.get("accelerator", "auto"), ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())))
    devices = trainer.get("devices", "auto")
    if isinstance(devices, typing.Sequence) and not isinstance(devices, str):
        for index in devices:
            check_int("trainer.devices", index, 0)
    elif devices not in ("auto", -1):
        check_int("trainer.devices", devices, 1, 1024)
    strategy = trainer.get("strategy", "auto")
    check_choice("trainer.strategy", strategy, ("auto", *StrategyRegistry.available_strategies()))
    precisions = [value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal)]
    check_choice("trainer.precision", trainer.get("precision", "32-true"), precisions)
    if trainer.get("inference_mode", True) is not False:
        raise SettingError(f"trainer.inference_mode={trainer.get('inference_mode')!r} is not allowed: false (inversion needs gradients)")


def prepare_inversion(cfg: DictConfig) -> PreparedInversion:
    """Check every setting of ``nulltext`` and build what needs no model weights (the first step of :func:`run_inversion`).

    Seed and LPIPS net; the model's shape from its config files (:func:`nulltext.models.model_shape`);
    the sampler's settings against it; the method (its constructor checks its settings) and, unless
    ``not_applicable=record``, that it runs on the model's family; the image
    resolution (a multiple of the model's VAE factor); the data module (its dataset's settings and
    files); the loggers and the trainer. Any bad value raises a NulltextError (one line).
    """
    from nulltext.diffusion import check_sampler_config
    from nulltext.methods import check_family
    from nulltext.metrics import LPIPS_NETS
    from nulltext.models import model_shape, pipeline_shape
    from nulltext.runner import progress_bar_settings

    check_given(cfg)
    check_seed("seed", cfg.seed)
    check_choice("lpips_net", cfg.lpips_net, LPIPS_NETS)
    check_text("task_name", cfg.task_name)
    check_choice("not_applicable", cfg.not_applicable, ("error", "record"))
    pipe = None
    try:
        shape = model_shape(cfg.model)
    except ModelUnavailableError:
        # Data paths are checked before any model: build the data first (any valid resolution
        # will do, its images are not read here).
        instantiate(cfg.data, resolution=cfg.data.get("resolution") or 1)
        raise
    if shape is None:
        pipe = instantiate(cfg.model)
        shape = pipeline_shape(pipe)
    check_sampler_config(cfg.diffusion, shape.max_steps)
    method = instantiate(cfg.inversion)
    if cfg.not_applicable == "error":
        check_family(method, shape.family)
    resolution = cfg.data.get("resolution")
    resolution = check_multiple("data.resolution", shape.resolution if resolution is None else resolution, shape.vae_factor)
    datamodule = instantiate(cfg.data, resolution=resolution)
    check_trainer(cfg.trainer)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    logs = [Path(logger.log_dir) for logger in loggers if isinstance(getattr(logger, "log_dir", None), str)]
    check_writable_folder(cfg.paths.output_dir, "the output folder", ("images", "inversions", *logs))
    progress = progress_bar_settings(cfg.trainer.get("enable_progress_bar"), sys.stderr.isatty())
    try:
        trainer = instantiate(cfg.trainer, logger=loggers or False, **progress)
    except Exception as error:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        # Lightning's own kind for settings this machine cannot run (e.g. accelerator=gpu without a GPU).
        if not isinstance(error.__cause__, MisconfigurationException):
            raise
        raise SettingError(f"the trainer settings cannot run here: {' '.join(str(error.__cause__).split())}") from None
    return PreparedInversion(method, datamodule, resolution, loggers, trainer, shape.family, pipe)


def run_inversion(cfg: DictConfig) -> dict:
    """Invert the dataset of ``cfg.data`` with ``cfg.inversion`` on ``cfg.model``; returns metrics.json's content."""
    from nulltext.methods import not_applicable_reason
    from nulltext.report import read_metrics
    from nulltext.runner import InversionModule, check_same_settings

    run = prepare_inversion(cfg)
    output_dir = Path(cfg.paths.output_dir)
    method, datamodule, resolution, loggers, trainer = run.method, run.datamodule, run.resolution, run.loggers, run.trainer
    record = {
        "model": choice("model") or str(cfg.model.get("path", cfg.model._target_)),
        "data": choice("data"),
        "resolution": resolution,
        "family": run.family,
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "diffusion_config": OmegaConf.to_container(cfg.diffusion, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    check_same_settings(output_dir, record["config"])
    reason = not_applicable_reason(method, run.family)
    if reason is not None:
        return record_not_applicable(output_dir, method, record, reason)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with resumable(output_dir):
        pipe = run.pipe if run.pipe is not None else instantiate(cfg.model)
        diffusion = instantiate(cfg.diffusion, pipe=pipe, resolution=resolution)
        module = InversionModule(diffusion, method, output_dir, seed=cfg.seed, lpips_net=cfg.lpips_net, record=record)
        try:
            trainer.test(module, datamodule=datamodule, verbose=False)
        finally:
            # A live wandb run would swallow the next multirun job's logs: end it here, always.
            for logger in loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.experiment.finish()
    if trainer.received_sigterm:
        # Lightning stops after the image in flight, but finishes the run when the signal came during
        # its last image, and a multirun's next job would start a fresh trainer: end the process here.
        raise stopped("SIGTERM", output_dir, 143)
    # Read back what rank 0 wrote: with spawned DDP processes this process's module saw no results.
    metrics = read_metrics(output_dir / "metrics.json")
    print(format_table([metrics]))
    print(f"outputs: {output_dir}")
    if not metrics["num_images"] and metrics["images"]:
        first = metrics["images"][0]
        raise NulltextError(f"every image of the run failed ({len(metrics['images'])}; {first['id']}: {first.get('error')}); see {output_dir / 'metrics.json'}")
    return metrics


def record_not_applicable(output_dir: Path, method: Any, record: dict, reason: str) -> dict:
    """metrics.json of a method that does not run on the model's family (``not_applicable=record``): no
    images, NaN means (as when every image failed) and the reason, which the summary tables show."""
    from nulltext.io import atomic_write_json
    from nulltext.provenance import provenance
    from nulltext.report import read_metrics
    from nulltext.runner import MEAN_KEYS

    metrics = {
        "method": method.name,
        "method_config": method.config(),
        **record,
        "not_applicable": reason,
        **{f"{key}_mean": math.nan for key in MEAN_KEYS},
        "num_images": 0,
        "num_failed": 0,
        "images": [],
        **provenance(),
    }
    atomic_write_json(output_dir / "metrics.json", metrics)
    print(format_table([metrics]))
    print(f"outputs: {output_dir}")
    return read_metrics(output_dir / "metrics.json")


def check_reconstruction(cfg: DictConfig) -> None:
    """``nulltext reconstruct``'s one setting: the artifact is given (its file is checked when it is read)."""
    check_given(cfg)
    check_text("artifact", cfg.artifact)


def run_reconstruction(cfg: DictConfig) -> Path:
    """Rebuild the pipeline recorded in an artifact, re-sample, write ``<stem>.png`` in the run dir."""
    from nulltext.api import reconstruct_artifact
    from nulltext.runner import save_png

    check_reconstruction(cfg)
    path = Path(cfg.paths.output_dir) / f"{Path(cfg.artifact).stem}.png"
    save_png(path, reconstruct_artifact(cfg.artifact))
    print(f"reconstruction: {path}")
    return path


def _written(path: Path) -> tuple[int, int]:
    """What changes when a file is written again (atomic writes rename a new file into place)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


class SummaryTable(Callback):
    """A multirun holds its sweep folder's lock; after it, one table row per job of this sweep from the
    jobs' metrics.json files (not those an earlier sweep into the same folder left), then exit status 2
    if a job failed (:data:`nulltext.apps.FAILED_JOBS`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.lock = FolderLock(config.hydra.sweep.dir, "hydra.sweep.dir", config.hydra.job.config_name)
        try:
            self.lock.acquire()
        except NulltextError as error:
            print(f"nulltext: error: {error}", file=sys.stderr)
            sys.exit(2)
        self.earlier = {p: _written(p) for p in Path(config.hydra.sweep.dir).glob("*/metrics.json")}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from nulltext.apps import FAILED_JOBS
        from nulltext.report import read_metrics

        self.lock.release()
        failed = list(FAILED_JOBS)
        if kwargs.get("config_name") == "config":
            paths = [p for p in Path(config.hydra.sweep.dir).glob("*/metrics.json") if self.earlier.get(p) != _written(p)]
            # Job folders are "<n>_<method>": order by the job number, not as strings ("10" < "2").
            by_job = sorted(paths, key=lambda p: (int(p.parent.name.split("_")[0]) if p.parent.name.split("_")[0].isdigit() else 0, p.parent.name))
            rows = []
            for path in by_job:
                try:
                    rows.append(read_metrics(path))
                except NulltextError as error:
                    print(f"nulltext: error: {error}", file=sys.stderr)
                    failed.append(path.parent.name)
            if rows:
                print(format_table(rows))
        if failed:
            print(f"nulltext: error: {len(failed)} job(s) failed: {', '.join(dict.fromkeys(failed))} (their errors are above)", file=sys.stderr)
            sys.exit(2)


# The settings check of each app (config name -> function of the composed config): the first step of
# its task function, so that the command line and tests run the same checks.
SETTING_CHECKS = {
    "config": prepare_inversion,
    "reconstruct": check_reconstruction,
    "edit": check_edit,
    "attention": check_attention,
    "edit_bench": check_edit_bench,
}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def invert_app(cfg: DictConfig) -> float:
    # Returned so that Hydra sweepers can optimise it.
    metrics = report_errors(in_own_folder(run_inversion))(cfg)
    return metrics["psnr_mean"] if metrics else math.nan


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reconstruct")
def reconstruct_app(cfg: DictConfig) -> None:
    report_errors(in_own_folder(run_reconstruction))(cfg)


SUBCOMMANDS = {"reconstruct": reconstruct_app, "edit": edit_app, "attention": attention_app, "edit_bench": edit_bench_app}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from nulltext.report import main as report

        try:
            report(sys.argv[2:])
        except NulltextError as error:
            print(f"nulltext: error: {error}", file=sys.stderr)
            sys.exit(2)
    elif len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        app = SUBCOMMANDS[sys.argv.pop(1)]
        app()
    else:
        invert_app()
