"""Command line: ``nulltext [overrides]`` (invert a dataset), ``nulltext reconstruct artifact=...``,
``nulltext report <sweep dir>``, and the editing apps ``nulltext edit``, ``nulltext attention`` and
``nulltext edit_bench`` (:mod:`nulltext.editing.cli`).

Both are Hydra apps over the configs in ``conf/``. The task functions (:func:`run_inversion`,
:func:`run_reconstruction`) take a composed config and are what tests call.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nulltext.editing.cli import attention_app, edit_app, edit_bench_app
from nulltext.errors import NulltextError

log = logging.getLogger("nulltext")

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
TABLE_COLUMNS = ("method", "PSNR", "LPIPS", "VAE PSNR", "iters", "s/image", "images")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of run summaries (metrics.json dictionaries)."""

    def cells(m: dict) -> tuple[str, ...]:
        failed = f" ({m['num_failed']} failed)" if m.get("num_failed") else ""
        number = lambda v, f: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
        return (
            m["method"],
            number(m.get("psnr_mean"), ".2f"),
            number(m.get("lpips_mean"), ".4f"),
            number(m.get("vae_psnr_mean"), ".2f"),
            number(m.get("iterations_mean"), ".0f"),
            number(m.get("seconds_mean"), ".2f"),
            f"{m.get('num_images', 0)}{failed}",
        )

    table = [TABLE_COLUMNS, *[cells(m) for m in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra app (e.g. model -> "tiny")."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def run_inversion(cfg: DictConfig) -> dict:
    """Invert the dataset of ``cfg.data`` with ``cfg.inversion`` on ``cfg.model``; returns metrics.json's content."""
    from nulltext.models import pipeline_resolution
    from nulltext.runner import InversionModule, progress_bar_settings

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    pipe = instantiate(cfg.model)
    diffusion = instantiate(cfg.diffusion, pipe=pipe)
    method = instantiate(cfg.inversion)
    resolution = cfg.data.get("resolution") or pipeline_resolution(pipe)
    datamodule = instantiate(cfg.data, resolution=resolution)
    record = {
        "model": choice("model") or str(cfg.model.get("path", cfg.model._target_)),
        "data": choice("data"),
        "resolution": resolution,
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "diffusion_config": OmegaConf.to_container(cfg.diffusion, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    module = InversionModule(diffusion, method, output_dir, seed=cfg.seed, lpips_net=cfg.lpips_net, record=record)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    progress = progress_bar_settings(cfg.trainer.get("enable_progress_bar"), sys.stderr.isatty())
    trainer = instantiate(cfg.trainer, logger=loggers or False, **progress)
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        # A live wandb run would swallow the next multirun job's logs: end it here, always.
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.finish()
    # Read back what rank 0 wrote: with spawned DDP processes this process's module saw no results.
    metrics = json.loads((output_dir / "metrics.json").read_text())
    print(format_table([metrics]))
    print(f"outputs: {output_dir}")
    return metrics


def run_reconstruction(cfg: DictConfig) -> Path:
    """Rebuild the pipeline recorded in an artifact, re-sample, write ``<stem>.png`` in the run dir."""
    from nulltext.api import reconstruct_artifact
    from nulltext.runner import save_png

    path = Path(cfg.paths.output_dir) / f"{Path(cfg.artifact).stem}.png"
    save_png(path, reconstruct_artifact(cfg.artifact))
    print(f"reconstruction: {path}")
    return path


class SummaryTable(Callback):
    """After a multirun, print one table row per job from the jobs' metrics.json files."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = Path(config.hydra.sweep.dir).glob("*/metrics.json")
        # Job folders are "<n>_<method>": order by the job number, not as strings ("10" < "2").
        by_job = sorted(paths, key=lambda p: (int(p.parent.name.split("_")[0]) if p.parent.name.split("_")[0].isdigit() else 0, p.parent.name))
        rows = [json.loads(p.read_text()) for p in by_job]
        if rows:
            print(format_table(rows))


def user_error(error: BaseException) -> NulltextError | None:
    """The NulltextError behind ``error``, also when hydra.utils.instantiate wrapped it."""
    while error is not None and not isinstance(error, NulltextError):
        error = error.__cause__
    return error


def _report_errors(task):
    """Run a task; a user error becomes one line on stderr, not a traceback.

    A single run then exits with status 2; in a multirun the failed job returns None and the
    sweep goes on (one bad job must not stop a cluster sweep).
    """

    def wrapped(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception as error:
            found = user_error(error)
            if found is None:
                raise
            print(f"nulltext: error: {found}", file=sys.stderr)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                return None
            sys.exit(2)

    return wrapped


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def invert_app(cfg: DictConfig) -> float:
    # Returned so that Hydra sweepers can optimise it.
    metrics = _report_errors(run_inversion)(cfg)
    return metrics["psnr_mean"] if metrics else math.nan


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reconstruct")
def reconstruct_app(cfg: DictConfig) -> None:
    _report_errors(run_reconstruction)(cfg)


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
