"""What the Hydra apps share (``nulltext``, ``reconstruct``: :mod:`nulltext.cli`; ``edit``,
``attention``, ``edit_bench``: :mod:`nulltext.editing.cli` and :mod:`nulltext.editing.benchmark`):
the config folder, plain values of config nodes, the settings checks the editing apps have in
common, and user errors reported as one line. Heavy imports stay inside the checks, so the command
line starts fast."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from nulltext.errors import NulltextError, user_error
from nulltext.validation import SettingError, check_choice, check_text

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def plain(value):
    """A config node as plain Python (dicts, lists), resolved; any other value as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


# The multirun jobs run by this process that ended with a user error (their folder names): the
# sweep goes on, and exits with status 2 at its end (:class:`nulltext.cli.SummaryTable`).
FAILED_JOBS: list[str] = []


def report_errors(task):
    """Run a task; a user error becomes one line on stderr, not a traceback.

    A single run then exits with status 2; in a multirun the failed job is recorded in
    :data:`FAILED_JOBS` and returns None, and the sweep goes on (one bad job must not stop a
    cluster sweep).
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
                FAILED_JOBS.append(Path(HydraConfig.get().runtime.output_dir).name)
                return None
            sys.exit(2)

    return wrapped


class OutputFolderCheck(Callback):
    """Before Hydra creates the run (or sweep) folder and writes into it: one line and status 2
    when it cannot be written into (read-only, a file in the way), instead of Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, setting: str) -> None:
        from nulltext.io import check_writable_folder

        try:
            check_writable_folder(folder, setting)
        except NulltextError as error:
            print(f"nulltext: error: {error}", file=sys.stderr)
            sys.exit(2)


def given_on_command_line(key: str) -> bool:
    """Whether the running app's command line sets ``key`` or a setting below it (``model=tiny``, ``model.path=...``)."""
    if not HydraConfig.initialized():
        return False
    names = (override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task)
    return any(name == key or name.startswith(key + ".") for name in names)


def check_common(cfg: DictConfig) -> None:
    """Settings every editing app has: mandatory values given, device, seed, LPIPS net, footprint threshold."""
    from nulltext.metrics import LPIPS_NETS
    from nulltext.models import resolve_device
    from nulltext.validation import check_given, check_probability, check_seed

    check_given(cfg)
    resolve_device(cfg.get("device"))
    for key, check, args in (("seed", check_seed, ()), ("lpips_net", check_choice, (LPIPS_NETS,)), ("footprint_threshold", check_probability, ())):
        if key in cfg:
            check(key, cfg[key], *args)


def method_options(value, name: str = "method_options") -> dict:
    """A ``method_options`` setting as a plain dict (null -> {})."""
    options = plain(value)
    if options is not None and not isinstance(options, dict):
        raise SettingError(f"{name}={options!r} is not allowed: null or {{option: value}}")
    return options or {}


# SD and SDXL edit through diffusers attention processors on a 77-token text axis; the rectified-flow
# families (SD3, FLUX: joint attention in a transformer) edit with FlowEdit.
FLOW_FAMILIES = ("sd3", "flux")


def check_editable_family(family: str, mode: str | None = None) -> None:
    """Prompt-to-Prompt, SDEdit and the attention maps run on SD 1.x/2.x and SDXL models, FlowEdit
    (``mode`` flowedit) on SD3 and FLUX (a one-line error for the others)."""
    flow = family in FLOW_FAMILIES
    if mode == "flowedit" and not flow:
        raise SettingError(f"mode=flowedit (FlowEdit) runs on SD3 and FLUX models only, this is a {family} model: use mode=replace, refine, reweight or sdedit")
    if flow and mode != "flowedit":
        raise SettingError(
            f"Prompt-to-Prompt, SDEdit and the attention maps run on SD 1.x/2.x and SDXL models, this is a {family} model: "
            "edit it with FlowEdit (inversion-free): mode=flowedit image=<file> caption=<source prompt>"
        )


def check_methods(cfg: DictConfig, options: dict[str, dict]) -> dict:
    """The inversion methods (name -> options) built (their constructors check the options) and the
    sampler settings of ``cfg.diffusion`` checked against ``cfg.model``'s config, before any model loads."""
    from nulltext.diffusion import check_sampler_config
    from nulltext.methods import make_method
    from nulltext.models import model_shape

    shape = model_shape(cfg.model)
    if shape is not None:
        check_editable_family(shape.family)
    check_sampler_config(cfg.diffusion, shape.max_steps if shape else 999)
    return {name: make_method(check_text("method", name), **opts) for name, opts in options.items()}
