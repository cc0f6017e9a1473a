"""What the Hydra apps share (``nulltext``, ``reconstruct``: :mod:`nulltext.cli`; ``edit``,
``attention``, ``edit_bench``: :mod:`nulltext.editing.cli`): the config folder, plain values of
config nodes, and user errors reported as one line."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from nulltext.errors import user_error

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def plain(value):
    """A config node as plain Python (dicts, lists), resolved; any other value as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def report_errors(task):
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
