"""The method comparison: UNet evaluations counted on the UNet, peak memory, experiment=compare_methods and its report."""

import csv

import pytest
import torch

from helpers import composed, run_nulltext
from nulltext.cli import run_inversion
from nulltext.cost import CPU_PEAK, CUDA_PEAK, PeakMemory, UNetCounter, peak_memory_definition
from nulltext.diffusion import Diffusion

S = 3  # DDIM steps of every run here


def test_the_counter_adds_the_rows_of_every_unet_call_and_nothing_when_paused_or_removed(tiny_pipe):
    diffusion = Diffusion(tiny_pipe, num_inference_steps=S)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = diffusion.encode_text(["a cat"] * 3)
    null = diffusion.encode_text([""]).expand_as(cond)
    with torch.no_grad(), UNetCounter(tiny_pipe.unet) as counter:
        diffusion.model_output(z, 981, cond)
        assert counter.rows == 3
        diffusion.guided_output(z, 981, null, cond, 7.5)  # one call on [uncond; cond]: 2 per image
        assert counter.rows == 3 + 6
        diffusion.guided_output(z, 981, null, cond, 1.0)  # w = 1 skips the unconditional half
        assert counter.rows == 3 + 6 + 3
        with counter.paused():
            tiny_pipe.unet(z[:2], 981, encoder_hidden_states=cond[:2])
        assert counter.rows == 12
        tiny_pipe.unet(sample=z[:1], timestep=981, encoder_hidden_states=cond[:1])  # keyword call
        assert counter.rows == 13
    with torch.no_grad():
        diffusion.model_output(z, 981, cond)
    assert counter.rows == 13, "a removed counter counts nothing"
    assert not tiny_pipe.unet._forward_pre_hooks


def unet_counts(tmp_path, overrides):
    """(inversion, reconstruction) UNet evaluations per image of a real run on two images in one batch."""
    run = ["model=tiny", f"diffusion.num_inference_steps={S}", "data.limit=2", "data.batch_size=2", "logger=none", *overrides]
    with composed("config", run, tmp_path) as cfg:
        metrics = run_inversion(cfg)
    counts = {(r["inversion_unet_evaluations"], r["reconstruction_unet_evaluations"]) for r in metrics["images"]}
    assert len(counts) == 1 and metrics["num_images"] == 2
    return counts.pop()


N = 2  # Adam steps per timestep
NO_EARLY_STOP = ["inversion.early_stop_epsilon=0", "inversion.early_stop_slope=0", f"inversion.num_inner_steps={N}"]


@pytest.mark.parametrize(
    "overrides, inversion",
    [
        # The w = 1 pivot: one conditional call per step.
        (["inversion=ddim"], S),
        (["inversion=vae"], 0),
        # Algorithm 1, fast engine: the pivot, then per step the fixed branch once, N optimisation
        # calls on the null text, and the advance reusing the fixed branch (one more call).
        (["inversion=null_text", *NO_EARLY_STOP], S + S * (1 + N + 1)),
        # The official loop: the same, but its advance is one call on [uncond; cond] (2 per image).
        (["inversion=null_text_reference", *NO_EARLY_STOP], S + S * (1 + N + 2)),
        # Global null-text, 2 passes: per step a conditional and an unconditional call, then a guided
        # advance on [uncond; cond]. The reconstruction after pass 1 (its curve) is not counted.
        (["inversion=null_text_global", "inversion.num_passes=2"], S + 2 * S * (1 + 1 + 2)),
    ],
    ids=["ddim", "vae", "null_text", "null_text_reference", "null_text_global"],
)
def test_runs_count_the_unet_evaluations_the_algorithm_makes(tmp_path, overrides, inversion):
    # The reconstruction samples S steps at w = 7.5 on [uncond; cond]: 2S (none for the VAE bound).
    reconstruction = 0 if inversion == 0 else 2 * S
    assert unet_counts(tmp_path, overrides) == (inversion, reconstruction)


@pytest.mark.skipif(peak_memory_definition("cpu") != CPU_PEAK, reason="needs Linux's resettable peak RSS")
def test_cpu_peak_memory_sees_an_allocation_inside_the_block_and_is_reset_for_the_next():
    size = 256 * 2**20
    with PeakMemory("cpu") as busy:
        block = torch.ones(size // 4)  # written, so resident
        del block
    with PeakMemory("cpu") as idle:
        pass
    assert busy.definition == idle.definition == CPU_PEAK
    assert busy.mib - idle.mib > 0.9 * size / 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_the_allocators_peak_inside_the_block():
    size = 256 * 2**20
    with PeakMemory("cuda") as busy:
        block = torch.ones(size // 4, device="cuda")
        del block
    with PeakMemory("cuda") as idle:
        pass
    assert busy.definition == CUDA_PEAK
    assert busy.mib - idle.mib == pytest.approx(size / 2**20, rel=0.01)


@pytest.mark.slow
def test_compare_methods_then_report_gives_a_complete_row_per_method_and_the_budget_curve(tmp_path):
    from nulltext.report import PAPER_NAMES, build_report

    sweep = tmp_path / "sweep"
    common = ["experiment=compare_methods", "model=tiny", "diffusion.num_inference_steps=2", "data.limit=2", "logger=none"]
    methods = ["vae", "ddim", "negative_prompt", "null_text", "fixed_point"]  # fixed-point samples at its own w = 2
    result = run_nulltext(*common, f"hydra.sweeper.params.inversion='{','.join(methods)}'", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # A budget of the documented sub-sweep (null-text with N = 1 beside the main sweep's N = 10), as
    # its job runs it: the same composed config, in this process to save a second start-up.
    budget = ["inversion=null_text", "inversion.num_inner_steps=1"]
    with composed("config", [*common, *budget], sweep / "budgets" / "0_null_text") as cfg:
        run_inversion(cfg)

    # The edit benchmark in the sweep directory, as the experiment's comment runs it: ddim and
    # null-text with their defaults (null-text's N = 10 job gets its columns, the N = 1 budget none).
    from nulltext.editing.benchmark import run_edit_bench

    bench_run = ["model=tiny", "diffusion.num_inference_steps=2", "num_cases=2", "grid_cases=0", "methods=[ddim,null_text]"]
    with composed("edit_bench", bench_run, sweep / "edit_bench") as cfg:
        bench = run_edit_bench(cfg)

    written = build_report(sweep)
    out = sweep / "report"
    assert set(written["comparison"]) == {out / "comparison.png", out / "comparison.svg"}
    for path in written["comparison"]:
        assert path.stat().st_size > 10_000
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["vae", "ddim", "negative_prompt", "null_text", "null_text", "fixed_point"]
    edit_keys = {"edit_success": "success", "edit_background_psnr": "background_psnr",
                 "edit_background_lpips": "background_lpips", "seconds_edit": "seconds_edit"}
    assert [r["guidance_scale"] for r in rows] == ["", "7.5", "7.5", "7.5", "7.5", "2.0"]
    joined = {1: "ddim", 4: "null_text"}  # row index -> the benchmark's method
    for i, row in enumerate(rows):
        measured = {k: v for k, v in row.items() if k not in {*edit_keys, "guidance_scale", "not_applicable"}}
        assert all(value not in ("", "nan", "None") for value in measured.values()), row
        assert row["images"] == "2"
        if i in joined:
            assert {k: float(row[k]) for k in edit_keys} == pytest.approx({k: float(bench[joined[i]][v]) for k, v in edit_keys.items()})
        else:
            assert all(row[k] == "" for k in edit_keys), row
    # Budgets, smallest first; null-text never stops early on the random model: S (1 + N + 1) + S.
    assert [(r["variant"], float(r["unet_inversion"])) for r in rows[3:5]] == [
        ("Null-text (per step) (num_inner_steps=1)", 2 + 2 * 3),
        ("Null-text (per step) (num_inner_steps=10)", 2 + 2 * 12),
    ]
    assert [float(r["unet_reconstruction"]) for r in rows] == [0, 4, 4, 4, 4, 4]
    table = (out / "comparison.md").read_text()
    assert table.startswith("Reconstruction: model tiny, data samples (2 images, ") and ", 2 DDIM steps." in table.splitlines()[0]
    for method in methods[:3]:
        assert sum(line.startswith(f"| {PAPER_NAMES[method]} |") for line in table.splitlines()) == 1
    assert "n/a" not in table and "not applicable" not in table and all(r["not_applicable"] == "" for r in rows)
    success = f"{100 * float(bench['null_text']['success']):.0f}%"
    null_text_rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| Null-text (per step) (")]
    assert [r[-4] for r in null_text_rows] == ["-", success] and "edit_bench/edit_bench.json" in table


def test_make_compare_edits_with_every_compared_method_that_has_prompt_to_prompt():
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    from nulltext.methods import METHODS, VAEReconstruction, make_method

    root = Path(__file__).resolve().parents[1]
    swept = OmegaConf.load(root / "conf/experiment/compare_methods.yaml").hydra.sweeper.params.inversion.split(",")
    editing = re.search(r"^EDITING := (\S+)$", (root / "Makefile").read_text(), re.M)[1].split(",")
    # The edit benchmark runs on SD models only (nulltext.apps.check_editable_family).
    editable = [m for m in swept if not isinstance(make_method(m), VAEReconstruction) and make_method(m).editable and "sd" in METHODS[m].families]
    assert editing == editable
    assert f"methods='[{','.join(editable)}]'" in (root / "conf/experiment/compare_methods.yaml").read_text()


def test_a_method_of_another_family_is_recorded_as_not_applicable_before_any_model_loads(tmp_path):
    from nulltext.methods import METHODS, not_applicable_reason
    from nulltext.report import read_metrics
    from nulltext.validation import SettingError

    run = ["model=tiny_sd3", "inversion=ddim", "data.limit=1", "logger=none"]
    reason = not_applicable_reason(METHODS["ddim"], "sd3")
    with composed("config", run, tmp_path / "plain") as cfg, pytest.raises(SettingError, match=f"\\(ddim: {reason}\\)$"):
        run_inversion(cfg)  # a plain run stops with one line, as before
    with composed("config", [*run, "not_applicable=skip"], tmp_path / "bad") as cfg, pytest.raises(SettingError, match="not_applicable='skip'"):
        run_inversion(cfg)
    with composed("config", [*run, "not_applicable=record"], tmp_path / "record") as cfg:
        run_inversion(cfg)
    metrics = read_metrics(tmp_path / "record" / "metrics.json")
    assert (metrics["method"], metrics["family"], metrics["not_applicable"]) == ("ddim", "sd3", reason)
    assert metrics["images"] == [] and metrics["num_images"] == metrics["num_failed"] == 0
    assert sorted(p.name for p in (tmp_path / "record").iterdir()) == ["metrics.json"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, family, methods, sampler",
    [
        ("tiny_xl", "sdxl", ["vae", "null_text_global", "ddim", "flow_inversion"], "DDIM"),
        ("tiny_sd3", "sd3", ["vae", "ddim", "flow_inversion", "negative_prompt"], "rectified-flow Euler"),
    ],
)
def test_compare_methods_on_another_family_runs_its_methods_and_lists_the_others_with_the_reason(tmp_path, model, family, methods, sampler):
    import math

    from nulltext.methods import METHODS, not_applicable_reason
    from nulltext.report import PAPER_NAMES, build_report, read_metrics

    sweep = tmp_path / "sweep"
    result = run_nulltext("experiment=compare_methods", f"model={model}", "diffusion.num_inference_steps=2", "data.limit=1", "logger=none",
                          f"hydra.sweeper.params.inversion='{','.join(methods)}'", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nulltext: error" not in result.stderr
    reasons = {m: not_applicable_reason(METHODS[m], family) for m in methods}
    assert [m for m in methods if reasons[m] is None] == ["vae", methods[2]]

    summary = result.stdout[result.stdout.rindex("\nmethod ") :]  # the sweep's table, after each job's own
    assert [line.split()[0] for line in summary.strip().splitlines()[2:6]] == methods
    for method, reason in reasons.items():
        assert (f"{method}: not applicable to {family} models: {reason}" in summary) == (reason is not None)
    jobs = {m["method"]: m for m in map(read_metrics, sweep.glob("*/metrics.json"))}
    for method, reason in reasons.items():
        job = jobs[method]
        assert (job["family"], job.get("not_applicable")) == (family, reason)
        assert job["num_images"] == (0 if reason else 1) and all(r["status"] == "ok" for r in job["images"])
        assert math.isfinite(job["psnr_mean"]) != bool(reason)

    build_report(sweep)
    rows = {r["method"]: r for r in csv.DictReader((sweep / "report" / "comparison.csv").open())}
    assert list(rows) == methods
    table = (sweep / "report" / "comparison.md").read_text()
    assert table.splitlines()[0].endswith(f"(1 images, 64 px), 2 {sampler} steps.")
    for method, reason in reasons.items():
        assert rows[method]["not_applicable"] == (reason or "")
        assert (rows[method]["psnr_mean"] == "") == bool(reason)
        assert (f"| {PAPER_NAMES[method]} | - | not applicable: {reason} | - |" in table) == bool(reason)
    assert float(rows[methods[2]]["unet_inversion"]) == 2  # the w = 1 inversion: one call per step


def test_compare_methods_compares_inversions_on_every_family():
    from pathlib import Path

    from omegaconf import OmegaConf

    from nulltext.families import FAMILIES
    from nulltext.methods import METHODS

    experiment = Path(__file__).resolve().parents[1] / "conf/experiment/compare_methods.yaml"
    swept = OmegaConf.load(experiment).hydra.sweeper.params.inversion.split(",")
    for family in FAMILIES:
        assert [m for m in swept if m != "vae" and family in METHODS[m].families], f"nothing to compare with the VAE bound on {family} models"
