"""The experiment runner end to end: configs, multirun, artifacts, wandb, the API."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_object, instantiate
from PIL import Image

from helpers import FAST, composed, run_nulltext
from nulltext.cli import CONFIG_DIR, run_inversion, run_reconstruction
from nulltext.methods import METHODS

CONF = Path(CONFIG_DIR)
GROUPS = ["model", "data", "inversion", "diffusion", "trainer", "logger"]
IMAGE_FIELDS = {"id", "caption", "psnr", "lpips", "vae_psnr", "iterations", "seconds"}
RUN_FIELDS = {"method", "model", "images", "psnr_mean", "lpips_mean", "vae_psnr_mean", "lpips", "versions", "git"}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group, tmp_path):
    for option in options(group):
        overrides = [f"{group}={option}"]
        with composed("config", overrides, tmp_path) as cfg:
            # Every constructor a config names must exist (logger configs are dicts of loggers).
            nodes = cfg[group].values() if group == "logger" else [cfg[group]]
            for node in nodes:
                assert callable(get_object(node._target_)), f"{group}={option}: {node._target_}"
            if group == "data":
                assert callable(get_object(cfg.data.dataset._target_))
            if group == "inversion":
                method = instantiate(cfg.inversion)
                assert method.name == option, "the config file name is the method's name"


def test_every_method_has_a_config():
    assert set(options("inversion")) == set(METHODS)


def test_experiment_configs_compose(tmp_path):
    for option in options("experiment"):
        with composed("config", [f"experiment={option}"], tmp_path) as cfg:
            # Each experiment names its outputs after itself: its values win over the primary config's.
            assert cfg.task_name == option


def load_metrics(path):
    metrics = json.loads(Path(path).read_text())
    assert RUN_FIELDS <= set(metrics)
    ok = [r for r in metrics["images"] if r["status"] == "ok"]
    for record in ok:
        assert IMAGE_FIELDS <= set(record)
        assert np.isfinite(record["psnr"]) and 0 <= record["lpips"] < 2
    assert metrics["psnr_mean"] == pytest.approx(np.mean([r["psnr"] for r in ok]))
    return metrics


# Every method that runs on the SD family (the tiny model's); tests/test_families.py runs the others.
SD_METHODS = {name: cls for name, cls in METHODS.items() if "sd" in cls.families}


@pytest.mark.slow
def test_multirun_over_all_methods_writes_complete_metrics_per_job(tmp_path):
    result = run_nulltext(
        "-m",
        f"inversion={','.join(sorted(SD_METHODS))}",
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
    assert len(jobs) == len(SD_METHODS)
    methods = set()
    for path in jobs:
        metrics = load_metrics(path)
        methods.add(metrics["method"])
        assert metrics["num_images"] == 2 and metrics["num_failed"] == 0
        assert len(list((path.parent / "inversions").glob("*.safetensors"))) == 2
        assert len(list((path.parent / "images").glob("*.png"))) == 2
    assert methods == set(SD_METHODS)
    # The closing summary table has one row per job.
    table_rows = [line.split()[0] for line in result.stdout.splitlines() if line.split() and line.split()[0] in SD_METHODS]
    assert sorted(table_rows[-len(SD_METHODS):]) == sorted(SD_METHODS)


def test_reconstruction_from_a_saved_artifact_equals_the_in_run_one(tmp_path):
    run_dir = tmp_path / "run"
    with composed("config", [*FAST, "inversion=null_text", "data.limit=1", "inversion.num_inner_steps=3"], run_dir) as cfg:
        metrics = run_inversion(cfg)
    image_id = metrics["images"][0]["id"]
    in_run = np.asarray(Image.open(run_dir / "images" / f"{image_id}.png"))
    width = in_run.shape[1] // 3
    in_run_reconstruction = in_run[:, 2 * width :]
    record = json.loads((run_dir / "inversions" / f"{image_id}.json").read_text())
    assert record["prompt"] == metrics["images"][0]["caption"]
    assert record["git"].keys() == {"commit", "dirty"} and "torch" in record["versions"]
    assert record["method"]["num_inner_steps"] == 3

    with composed("reconstruct", [f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"], tmp_path / "rec") as cfg:
        path = run_reconstruction(cfg)
    rebuilt = np.asarray(Image.open(path))
    assert rebuilt.shape == in_run_reconstruction.shape
    np.testing.assert_array_equal(rebuilt, in_run_reconstruction)
    # The reconstruction is not the input (the test would pass trivially on an identity).
    assert np.abs(rebuilt.astype(int) - in_run[:, :width].astype(int)).mean() > 1


def read_wandb_records(path):
    """Records of an offline ``.wandb`` file: a LevelDB-style log of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def wandb_summary(run_dir):
    summary = {}
    for record in read_wandb_records(next(run_dir.glob("*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = item.value_json
    return summary


@pytest.mark.slow
def test_wandb_offline_runs_record_metrics_and_multirun_jobs_do_not_merge(tmp_path):
    result = run_nulltext(
        "-m",
        "inversion=ddim,negative_prompt",
        "logger=wandb",
        "data.limit=1",
        "diffusion.num_inference_steps=3",
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0_ddim", "1_negative_prompt"):
        runs = list((tmp_path / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job} must have its own wandb run"
        summary = wandb_summary(runs[0])
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert float(summary["test/psnr"]) == pytest.approx(metrics["psnr_mean"], rel=1e-5)
        assert float(summary["test/lpips"]) == pytest.approx(metrics["lpips_mean"], rel=1e-5)
        assert "latent_error/" + metrics["images"][0]["id"] + "_table/_type" in summary


def test_bad_images_are_recorded_as_failed_and_the_others_go_on(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "red.png")
    Image.new("I;16", (64, 64), 40000).save(folder / "deep.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    long_caption = "a red square " * 40
    (folder / "captions.csv").write_text(
        "image,caption\nred.png,a red square\nbroken.png,a broken file\nmissing.png,nothing here\n"
        f"deep.png,{long_caption}\n"
    )
    overrides = [*FAST, "inversion=ddim", "data=folder", f"data.dataset.path={folder}"]
    with composed("config", overrides, tmp_path / "run") as cfg:
        metrics = run_inversion(cfg)
    status = {r["id"]: r for r in metrics["images"]}
    assert status["red"]["status"] == "ok" and status["deep"]["status"] == "ok"
    assert status["broken"]["status"] == "failed" and "cannot read image" in status["broken"]["error"]
    assert status["missing"]["status"] == "failed" and "not found" in status["missing"]["error"]
    assert metrics["num_images"] == 2 and metrics["num_failed"] == 2
    assert any("truncated to 77" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["num_failed"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inversion=no_such_method"], "Could not find 'inversion/no_such_method'"),
        (["model=no_such_model"], "Could not find 'model/no_such_model'"),
        (["data=no_such_data"], "Could not find 'data/no_such_data'"),
    ],
)
def test_unknown_config_names_list_the_options(tmp_path, overrides, message):
    result = run_nulltext(*overrides, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Available options" in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=sd14"], "cannot load model 'CompVis/stable-diffusion-v1-4'"),
        (["model=sd3"], "cannot load model 'stabilityai/stable-diffusion-3-medium-diffusers'"),
        (["model=sd14", "model.path=not-a-model"], "unknown model 'not-a-model'"),
        (["data=folder", "data.dataset.path=/no/such/folder"], "/no/such/folder"),
    ],
)
def test_unavailable_weights_and_bad_paths_give_one_line(tmp_path, overrides, message):
    result = run_nulltext(*overrides, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("nulltext: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_api_inverts_one_image(tiny_pipe):
    from nulltext import invert
    from nulltext.data import SampleImages

    image = SampleImages(resolution=64)[0]
    photo = Image.fromarray(image["image"].permute(1, 2, 0).numpy()).convert("RGBA")
    result = invert(tiny_pipe, photo, image["caption"], method="null_text", num_inference_steps=4, num_inner_steps=2)
    assert result.z_T.shape == (4, 16, 16)
    assert result.null_embeddings.shape == (4, 77, 32)
    assert result.reconstruction.size == (64, 64)
    assert result.metrics["iterations"] == 8
    # Per-step embeddings really differ from step to step (they were optimised one by one).
    assert not torch.allclose(result.null_embeddings[0], result.null_embeddings[-1])
    with pytest.raises(Exception, match="unknown inversion method 'nope'"):
        invert(tiny_pipe, photo, "x", method="nope")
