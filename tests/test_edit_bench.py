"""``nulltext edit_bench``: colour-swap cases with known answers, their measures, and the CLI task."""

import json
import math

import pytest
import torch

from helpers import composed
from nulltext.editing.benchmark import EditScorer, colour_swap_cases, format_table
from nulltext.scenes import COLOURS


@pytest.fixture(scope="module")
def cases():
    return colour_swap_cases(6, resolution=32, seed=4, dilate=0)


def test_cases_swap_one_colour_for_a_colour_the_scene_lacks(cases):
    assert cases.ids == [f"case-{i:03d}" for i in range(6)]
    for scene, target, (src, tgt) in zip(cases.scenes, cases.target_scenes, cases.swaps):
        assert scene.objects[0].colour == src and target.objects[0].colour == tgt
        assert tgt in COLOURS and tgt not in {o.colour for o in scene.objects}
        assert target.objects[1:] == scene.objects[1:] and target.background == scene.background
        assert all(o.size == "large" for o in scene.objects)
        assert target.caption == scene.caption.replace(src, tgt, 1)
    # With dilate=0 the edited region is exactly where the two renders differ, and it is never empty.
    changed = (cases.images != cases.ideal).any(dim=1, keepdim=True).float()
    assert torch.equal(cases.region, changed) and (changed.sum(dim=(1, 2, 3)) > 0).all()
    again = colour_swap_cases(6, resolution=32, seed=4, dilate=0)
    assert torch.equal(again.images, cases.images) and again.swaps == cases.swaps
    wider = colour_swap_cases(6, resolution=32, seed=4, dilate=1)
    assert (wider.region >= cases.region).all() and wider.region.sum() > cases.region.sum()


def test_scorer_reads_the_known_answers(cases):
    scorer = EditScorer(cases)
    ideal = scorer.score(cases.ideal, cases.images)
    assert all(r["success"] == 1.0 and r["recon_ok"] == 1.0 for r in ideal)  # the checker reads clean renders
    assert all(r["background_psnr"] == "inf" and r["ideal_psnr"] == "inf" for r in ideal)
    assert all(r["background_lpips"] == pytest.approx(0.0, abs=1e-6) for r in ideal)

    # No edit at all: the target colour is absent (failure), the background is untouched.
    unchanged = scorer.score(cases.images, cases.images)
    assert all(r["success"] == 0.0 and r["background_psnr"] == "inf" and r["footprint"] == 0.0 for r in unchanged)

    # Noise outside the edited region only: background PSNR is that of the noise, computed here directly.
    g = torch.Generator().manual_seed(0)
    noise = (torch.randint(-20, 21, cases.images.shape, generator=g) * (1 - cases.region)).to(torch.int16)
    noisy = (cases.ideal.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    rows = scorer.score(noisy, cases.images)
    for i, row in enumerate(rows):
        background = (1 - cases.region[i]).bool().expand(3, -1, -1)
        err = (noisy[i].float() - cases.images[i].float())[background] / 255
        assert row["background_psnr"] == pytest.approx(-10 * math.log10(err.pow(2).mean().item()), abs=1e-3)


def test_cli_edit_bench_writes_a_consistent_report(tmp_path, tiny_pipe):
    from nulltext.editing.benchmark import run_edit_bench

    torch.set_num_threads(1)
    overrides = [
        "model=tiny",
        "diffusion.num_inference_steps=3",
        "num_cases=2",
        "grid_cases=2",
        "methods=[ddim,null_text]",
        "method_options={null_text: {num_inner_steps: 1}}",
        "local_blend=true",
        "blend_resolution=8",
        "device=cpu",
    ]
    with composed("edit_bench", overrides, tmp_path) as cfg:
        summary = run_edit_bench(cfg)
    report = json.loads((tmp_path / "edit_bench.json").read_text())
    assert list(report["summary"]) == ["ideal", "ideal_vae", "ddim", "null_text"] and report["summary"] == summary
    for name, rows in report["per_case"].items():
        assert len(rows) == 2
        for key in ("recon_psnr", "success", "background_psnr", "footprint"):
            values = [float(r[key]) for r in rows]
            assert float(summary[name][key]) == pytest.approx(sum(values) / 2)
    assert summary["ideal"]["success"] == 1.0 and summary["ideal"]["background_psnr"] == "inf"
    # ideal_vae: the autoencoder's round trip of the renders, compared with an independent computation
    from nulltext.diffusion import Diffusion
    from nulltext.metrics import psnr_per_image
    from nulltext.reconstruction import to_uint8

    diffusion = Diffusion(tiny_pipe, num_inference_steps=3)
    cases = colour_swap_cases(2, resolution=64, seed=0, dilate=1)
    round_trip = to_uint8(diffusion.decode(diffusion.encode_images(cases.images)))
    expected = psnr_per_image(round_trip.float() / 255, cases.images.float() / 255)
    assert [r["recon_psnr"] for r in report["per_case"]["ideal_vae"]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert report["local_blend"] and report["edit_settings"]["mode"] == "replace"
    assert {"git", "versions"} <= report.keys()
    table = (tmp_path / "edit_bench.md").read_text()
    assert table.count("\n| ") == 5 and format_table(summary) in table  # header + 4 rows
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_cli_edit_bench_rejects_bad_settings(tmp_path):
    from nulltext.editing.benchmark import run_edit_bench
    from nulltext.editing.errors import EditError
    from nulltext.errors import UnknownNameError

    with composed("edit_bench", ["methods=[]"], tmp_path) as cfg, pytest.raises(EditError, match="at least one"):
        run_edit_bench(cfg)
    with composed("edit_bench", ["mode=sdedit", "local_blend=true"], tmp_path) as cfg, pytest.raises(EditError, match="local_blend"):
        run_edit_bench(cfg)
    with composed("edit_bench", ["methods=[null_text,vae]"], tmp_path) as cfg, pytest.raises(EditError, match="vae: a VAE reconstruction"):
        run_edit_bench(cfg)
    with composed("edit_bench", ["methods=[null_text,edict]"], tmp_path) as cfg, pytest.raises(EditError, match="Prompt-to-Prompt editing for: edict"):
        run_edit_bench(cfg)
    with composed("edit_bench", ["methods=[null_text,bogus]"], tmp_path) as cfg, pytest.raises(UnknownNameError, match="bogus"):
        run_edit_bench(cfg)
    assert not (tmp_path / "edit_bench.json").exists()
