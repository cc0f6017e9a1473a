"""Scaling out and resuming: DDP sharding gathers each image once; interrupted runs resume exactly."""

import csv
import json

import pytest

from helpers import FAST, composed, run_nulltext
from nulltext.cli import run_inversion
from nulltext.errors import NulltextError

# Measurements of the machine, not results: they differ between two runs of the same config.
TIMING = {"seconds", "peak_memory_mib"}


def without_timing(record):
    kept = {k: v for k, v in record.items() if k not in TIMING}
    if "curve" in kept:
        kept["curve"] = [without_timing(point) for point in kept["curve"]]
    return kept


def per_image(metrics):
    return {r["id"]: without_timing(r) for r in metrics["images"]}


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_matches_one_process(tmp_path):
    overrides = [*FAST, "inversion=null_text", "inversion.num_inner_steps=2", "data.limit=3"]
    with composed("config", overrides, tmp_path / "one") as cfg:
        single = run_inversion(cfg)
    with composed("config", [*overrides, "trainer=ddp_sim"], tmp_path / "ddp") as cfg:
        sharded = run_inversion(cfg)
    # Three images on two ranks: DDP pads one shard with a repeat; the gather keeps each image once.
    assert [r["id"] for r in sharded["images"]] == [r["id"] for r in single["images"]]
    ours, theirs = per_image(sharded), per_image(single)
    for image_id in theirs:
        for key in ("psnr", "lpips", "vae_psnr", "iterations", "z_T_log_likelihood"):
            # rel 1e-4: the spawned processes use other thread counts, hence other conv reduction orders.
            assert ours[image_id][key] == pytest.approx(theirs[image_id][key], rel=1e-4, abs=1e-6), (image_id, key)
    assert sharded["psnr_mean"] == pytest.approx(single["psnr_mean"], rel=1e-4)


def test_a_resumed_run_equals_an_uninterrupted_one_and_a_changed_config_is_refused(tmp_path):
    overrides = [*FAST, "inversion=null_text", "inversion.num_inner_steps=2", "data.limit=3"]
    with composed("config", overrides, tmp_path / "run") as cfg:
        full = run_inversion(cfg)
    # A killed job: one image never got its (last-written) artifact JSON; another left a temp file.
    (tmp_path / "run" / "inversions" / "cat.json").unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    with composed("config", overrides, tmp_path / "run") as cfg:
        resumed = run_inversion(cfg)
    assert per_image(resumed) == per_image(full)
    reused = [r for r in resumed["images"] if r["seconds"] == next(f for f in full["images"] if f["id"] == r["id"])["seconds"]]
    assert {r["id"] for r in reused} == {"astronaut", "coffee"}, "finished images are not recomputed"
    measured = {"images", *(f"{key}_mean" for key in TIMING)}
    assert {k: v for k, v in resumed.items() if k not in measured} == {k: v for k, v in full.items() if k not in measured}
    # The logged run means (Lightning's test/*, here through the CSV logger) count the reused images too.
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}
    for key in ("psnr", "lpips", "ssim", "vae_psnr", "seconds"):
        assert logged[f"test/{key}"] == pytest.approx(resumed[f"{key}_mean"], rel=1e-5), key
    # Another configuration into the same folder is refused, naming what differs: its results would
    # overwrite some of the finished images and metrics.json, and keep the others beside its own.
    finished = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.parent.name != "csv"}
    with composed("config", [*overrides[:-2], "inversion.num_inner_steps=1", "data.limit=3"], tmp_path / "run") as cfg:
        with pytest.raises(NulltextError, match=r"holds finished images made with other settings \(inversion.num_inner_steps: 2 there, 1 here; see"):
            run_inversion(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.parent.name != "csv"} == finished


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_hydra_launchers_run_every_job(tmp_path, launcher):
    result = run_nulltext(
        "-m",
        f"hydra/launcher={launcher}",
        "inversion=ddim,vae",
        "data.limit=1",
        "diffusion.num_inference_steps=2",
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    methods = sorted(json.loads(p.read_text())["method"] for p in tmp_path.glob("*/metrics.json"))
    assert methods == ["ddim", "vae"]


@pytest.mark.slow
def test_ablation_smoke_then_report_gives_every_variant(tmp_path):
    from nulltext.report import PAPER_NAMES

    sweep = tmp_path / "sweep"
    result = run_nulltext(
        "experiment=ablation_smoke",
        "model=tiny",
        "diffusion.num_inference_steps=3",
        "ablation.global_passes=2",
        "ablation.denoising_iterations=6",
        "ablation.report_every=3",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = run_nulltext("report", str(sweep), "--wandb", "nulltext-test", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert report.returncode == 0, report.stderr[-3000:]
    out = sweep / "report"
    for name in ("ablation.png", "ablation.svg", "ablation.csv", "ablation.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "ablation.md").read_text()
    variants = ["vae", "ddim", "null_text", "null_text_global", "random_pivot", "random_caption",
                "textual_inversion", "textual_inversion_pivot", "null_text_no_pivot", "negative_prompt"]
    for method in variants:
        assert f"| {PAPER_NAMES[method]} |" in table, method
    import csv

    rows = list(csv.DictReader((out / "ablation.csv").open()))
    per_step = sorted(float(r["iterations"]) for r in rows if r["method"] == "null_text")
    # N = 1, 2, 5 per step on 3 DDIM steps: the random-init model never stops early.
    assert per_step == [3.0, 6.0, 15.0]
    global_curve = [float(r["iterations"]) for r in rows if r["method"] == "null_text_global"]
    assert global_curve == [3.0, 6.0], "the global variant reports a point after every pass"
    textual = [float(r["iterations"]) for r in rows if r["method"] == "textual_inversion"]
    assert textual == [3.0, 6.0]
    # One wandb run per job, each with the curve table and the sample reconstructions.
    jobs = list(sweep.glob("*/metrics.json"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == len(jobs)
    for run in runs:
        media = run / "files" / "media"
        assert len(list(media.glob("images/reconstructions_*.png"))) == 2  # data.limit=2 images per job
        assert list(media.glob("table/curve/psnr_vs_iterations_table_*.table.json"))
