"""Composing the real Hydra configs for tests (each test gets its own output dir)."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from nulltext.cli import CONFIG_DIR

# Few steps and iterations so that every method runs in seconds on the tiny model.
FAST = [
    "model=tiny",
    "diffusion.num_inference_steps=4",
    "logger=csv",
]


@contextmanager
def composed(config_name: str, overrides: list[str], output_dir: Path):
    """The composed config with ``paths.output_dir`` set and HydraConfig installed, as in a real run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            del cfg.hydra
        yield cfg
    GlobalHydra.instance().clear()


def nulltext_command(*args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """The real command line (``python -m nulltext ...``) and its offline environment."""
    return [sys.executable, "-m", "nulltext", *args], {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}


def run_nulltext(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, offline, run to its end."""
    command, environment = nulltext_command(*args, env=env)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=1200)


def assert_reconstruct_reproduces(run_dir: Path, image_id: str, output_dir: Path) -> None:
    """`nulltext reconstruct` of a run's artifact equals the reconstruction panel the run saved, bit
    for bit, and is neither the input nor (unless the method is exact) the VAE image."""
    import numpy as np
    from PIL import Image

    from nulltext.cli import run_reconstruction

    in_run = np.asarray(Image.open(run_dir / "images" / f"{image_id}.png"))
    width = in_run.shape[1] // 3
    with composed("reconstruct", [f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"], output_dir) as cfg:
        rebuilt = np.asarray(Image.open(run_reconstruction(cfg)))
    np.testing.assert_array_equal(rebuilt, in_run[:, 2 * width :])
    assert np.abs(rebuilt.astype(int) - in_run[:, :width].astype(int)).mean() > 1
