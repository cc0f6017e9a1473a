"""What a new user meets first: the apps' help, `nulltext attention` with its defaults on every
offline model, and the Python API's checks (the command line's, in the API's own terms)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import composed, run_nulltext
from nulltext import invert, load_pipeline
from nulltext import models
from nulltext.cli import CONFIG_DIR, SUBCOMMANDS, run_inversion
from nulltext.editing.cli import run_attention
from nulltext.errors import ImageError, ModelUnavailableError, UnknownNameError
from nulltext.validation import SettingError

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def test_help_lists_every_app_with_one_line(tmp_path):
    result = run_nulltext("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    apps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("nulltext ")]
    for app in (*SUBCOMMANDS, "report"):
        assert apps.count(app) == 1, (app, result.stdout[:2000])
    assert "inversion: bdia, ddim" in result.stdout, "the groups and options are still listed"


@pytest.mark.parametrize("model", ["pocket", "tiny"])
def test_attention_runs_with_its_defaults_on_every_offline_model(tmp_path, model):
    overrides = [f"model={model}", "inversion=ddim", "diffusion.num_inference_steps=2", "data.limit=1"]
    with composed("config", overrides, tmp_path / "run") as cfg:
        run_inversion(cfg)
    with composed("attention", [f"artifact={tmp_path / 'run' / 'inversions' / 'astronaut.safetensors'}"], tmp_path / "attention") as cfg:
        run_attention(cfg)
    info = json.loads((tmp_path / "attention" / "attention.json").read_text())
    maps = load_file(str(tmp_path / "attention" / "attention.safetensors"))["maps"]
    side = info["map_size"][0]
    assert maps.shape == (len(info["tokens"]), side, side)
    # Attention probabilities: each query's weights over the prompt's tokens sum to at most 1.
    assert torch.isfinite(maps).all() and maps.min() >= 0 and (maps.sum(0) <= 1 + 1e-5).all()


def test_the_api_checks_its_arguments_in_its_own_terms(tiny_pipe, tmp_path):
    photo = Image.new("RGB", (64, 64), (120, 60, 30))
    cases = [
        ({"image": str(tmp_path / "no.jpg")}, ImageError, r"image not found: .*no\.jpg: give the path of an image file"),
        ({"image": 3}, SettingError, r"^image=3 is not allowed: the path of an image file or a PIL image"),
        ({"prompt": ""}, SettingError, r"^prompt='' is not allowed: a non-empty text"),
        ({"seed": -1}, SettingError, r"^seed=-1 is not allowed: an integer >= 0"),
        ({"num_inference_steps": 0}, SettingError, r"^num_inference_steps=0 is not allowed: an integer >= 1"),
        ({"guidance_scale": float("nan")}, SettingError, r"^guidance_scale=nan is not allowed: a finite number"),
        ({"num_inner_steps": 0}, SettingError, r"^num_inner_steps=0 is not allowed: an integer >= 1"),
    ]
    for change, kind, message in cases:
        args = {"image": photo, "prompt": "a brown square", "num_inference_steps": 2, **change}
        with pytest.raises(kind, match=message) as error:
            invert(tiny_pipe, args.pop("image"), args.pop("prompt"), **args)
        assert not any(word in str(error.value) for word in ("data.dataset", "diffusion.", "inversion.")), error.value


def test_load_pipeline_suggests_every_model_config(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownNameError, match="did you mean 'pocket'") as error:
        load_pipeline("pockett")
    assert f"({', '.join(MODEL_CONFIGS)})" in str(error.value)
    with pytest.raises(UnknownNameError) as error:  # the command line's model.path=
        models.load_pipeline("pockett")
    assert f"(model={', '.join(MODEL_CONFIGS)})" in str(error.value)
    # A model config whose weights are missing: the one-line error itself, not Hydra's wrapping of it.
    with pytest.raises(ModelUnavailableError, match=r"or load_pipeline\(<folder>\)"):
        load_pipeline("sd14")
