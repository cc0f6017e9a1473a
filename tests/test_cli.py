"""The experiment runner end to end: configs, multirun, artifacts, wandb, the API."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import FAST, composed
from nulltext.cli import CONFIG_DIR, run_inversion, run_reconstruction
from nulltext.methods import METHODS

CONF = Path(CONFIG_DIR)
GROUPS = ["model", "data", "inversion", "diffusion", "trainer", "logger"]
IMAGE_FIELDS = {"id", "caption", "psnr", "lpips", "vae_psnr", "iterations", "seconds"}
RUN_FIELDS = {"method", "model", "images", "psnr_mean", "lpips_mean", "vae_psnr_mean", "lpips", "versions", "git"}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def nulltext(*args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nulltext", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group, tmp_path):
    for option in options(group):
        overrides = [f"{group}={option}"]
        with composed("config", overrides, tmp_path) as cfg:
            assert cfg[group] is not None
            if group == "inversion":
                method = instantiate(cfg.inversion)
                assert method.name == option, "the config file name is the method's name"


def test_every_method_has_a_config():
    assert set(options("inversion")) == set(METHODS)


def test_experiment_configs_compose(tmp_path):
    for option in options("experiment"):
        with composed("config", [f"experiment={option}"], tmp_path) as cfg:
            assert cfg.model is not None


def load_metrics(path):
    metrics = json.loads(Path(path).read_text())
    assert RUN_FIELDS <= set(metrics)
    ok = [r for r in metrics["images"] if r["status"] == "ok"]
    for record in ok:
        assert IMAGE_FIELDS <= set(record)
        assert np.isfinite(record["psnr"]) and 0 <= record["lpips"] < 2
    assert metrics["psnr_mean"] == pytest.approx(np.mean([r["psnr"] for r in ok]))
    return metrics


@pytest.mark.slow
def test_multirun_over_all_methods_writes_complete_metrics_per_job(tmp_path):
    result = nulltext(
        "-m",
        f"inversion={','.join(sorted(METHODS))}",
        "model=tiny",
        "data=samples",
        "data.limit=2",
        "data.batch_size=2",
        "diffusion.num_inference_steps=3",
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(jobs) == len(METHODS)
    methods = set()
    for path in jobs:
        metrics = load_metrics(path)
        methods.add(metrics["method"])
        assert metrics["num_images"] == 2 and metrics["num_failed"] == 0
        assert len(list((path.parent / "inversions").glob("*.safetensors"))) == 2
        assert len(list((path.parent / "images").glob("*.png"))) == 2
    assert methods == set(METHODS)
    # The closing summary table has one row per job.
    table_rows = [line.split()[0] for line in result.stdout.splitlines() if line.split() and line.split()[0] in METHODS]
    assert sorted(table_rows[-len(METHODS):]) == sorted(METHODS)
