"""Scaling out and resuming: DDP sharding gathers each image once; interrupted runs resume exactly."""

import json

import pytest

from helpers import FAST, composed
from nulltext.cli import run_inversion

TIMING = {"seconds"}


def per_image(metrics):
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMING} for r in metrics["images"]}


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


def test_a_resumed_run_equals_an_uninterrupted_one_and_a_changed_config_recomputes(tmp_path):
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
    assert {k: v for k, v in resumed.items() if k not in ("images", "seconds_mean")} == {
        k: v for k, v in full.items() if k not in ("images", "seconds_mean")
    }
    # Any change of configuration invalidates every stored result.
    with composed("config", [*overrides[:-2], "inversion.num_inner_steps=1", "data.limit=3"], tmp_path / "run") as cfg:
        changed = run_inversion(cfg)
    assert all(r["iterations"] == 4 for r in changed["images"])
    stored = json.loads((tmp_path / "run" / "inversions" / "astronaut.json").read_text())
    assert stored["method"]["num_inner_steps"] == 1
