"""The measurement scripts (scripts/bench.py, scripts/precision_check.py) on the tiny model: the
rows they report exist, hold consistent numbers, and the equality / tolerance checks they print are
computed from the runs (speed itself is never asserted: timings belong to benchmark runs)."""

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The scripts set torch's thread count and the root logger (handlers, level) for their process."""
    threads, root = torch.get_num_threads(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    torch.set_num_threads(threads)
    for handler in set(root.handlers) - set(handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_bench_reports_every_engine_with_its_result_check(tmp_path):
    bench = load_script("bench")
    out = tmp_path / "bench.md"
    args = ["--model", "tiny", "--steps", "2", "--inner-steps", "2", "--batch-sizes", "1,2", "--early-stop", "off",
            "--variant", "static:static_batch=true", "--warmup-steps", "1", "--profile", "2", "--profile-steps", "1",
            "--profile-variant", "static", "--out", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    engines = [(r["engine"], r["batch"]) for r in rows]
    assert engines == [("null_text_reference", "1 (loop)"), ("null_text", 1), ("null_text", 2),
                       ("null_text[static]", 1), ("null_text[static]", 2), ("negative_prompt", 1), ("negative_prompt", 2)]
    for row in rows:
        assert row["status"] == "ok" and row["seconds_per_image"] > 0
        if row["engine"].startswith("null_text"):
            assert row["iterations"] == [2 * 2] * row["images"]  # early stopping off: S * N each
        if row["engine"] in ("null_text", "null_text[static]"):
            assert row["check"]["iterations_equal"] and row["check"]["uncond_rel"] < 1e-3
    profile = json.loads(out.with_suffix(".json").read_text())["profile"]
    assert (profile["variant"], profile["batch"], profile["steps"]) == ("static", 2, 1)
    assert "aten::" in profile["table"] and Path(profile["trace"]).stat().st_size > 0
    text = out.read_text()
    assert "| null_text[static] | off | 2 | 2 |" in text and "#### Profile: null_text (static), batch 2" in text
    assert "result equal (rel. err. < 1e-3)" in text and "a CPU smoke run is NOT evidence" in text


FLOW_ENGINES = ("flow_inversion", "rf_inversion", "rf_solver", "fireflow", "uniinv")


@pytest.mark.parametrize(("model", "engines", "family"), [
    ("tiny_xl", ["null_text", "negative_prompt"], "sdxl"),
    ("tiny_flux", [*FLOW_ENGINES], "flux"),
    ("tiny_sd3", ["null_text", *FLOW_ENGINES], "sd3"),  # null-text runs on SD3 (docs/sd3_null_text.md)
])
def test_bench_times_the_engines_of_each_model_family(tmp_path, model, engines, family):
    """SDXL, SD3 and FLUX (issue 19): the engines whose method runs on the family, at the model's resolution;
    the SD-only reference is named as not timed, and no ratio is computed without it."""
    bench = load_script("bench")
    out = tmp_path / "bench.md"
    args = ["--model", model, "--steps", "2", "--inner-steps", "2", "--batch-sizes", "1", "--early-stop", "off",
            "--warmup-steps", "1", "--out", str(out)]
    assert bench.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["engine"] for r in data["rows"]] == engines
    assert (data["setup"]["family"], data["setup"]["resolution"], data["setup"]["steps"]) == (family, 64, 2)
    for row in data["rows"]:
        assert row["status"] == "ok" and math.isfinite(row["seconds"]) and row["seconds_per_image"] > 0
        assert row["iterations"] == ([2 * 2] if row["engine"] == "null_text" else [0])  # S * N, early stopping off
    text = out.read_text()
    assert f"- model `{model}` (" in text and ", 64 px," in text
    assert (f"- not timed: null_text_reference (inversion=null_text_reference runs on sd models only; this model is "
            f"{family})") in text
    assert "No reference row, so no ratios (n/a)." in text
    for engine in engines:
        assert f"| {engine} | {'off' if engine == 'null_text' else 'n/a'} | 1 | 1 | " in text and "| n/ax |" not in text


def test_bench_times_the_null_text_memory_options(tmp_path):
    """bf16 UNet weights (--model-dtype) and gradient checkpointing (a --variant): the rows the GPU run
    fills for SDXL at 1024 px (docs/benchmarks.md), here on tiny_xl."""
    bench = load_script("bench")
    out = tmp_path / "bench.md"
    args = ["--model", "tiny_xl", "--steps", "2", "--inner-steps", "2", "--batch-sizes", "1", "--early-stop", "off",
            "--engines", "fast", "--model-dtype", "bf16", "--variant", "ckpt:gradient_checkpointing=true",
            "--warmup-steps", "0", "--out", str(out)]
    assert bench.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["engine"] for r in data["rows"]] == ["null_text", "null_text[ckpt]"] and data["setup"]["weights_dtype"] == "bf16"
    assert all(r["status"] == "ok" and r["iterations"] == [2 * 2] for r in data["rows"])
    assert "parameters, bf16 weights), 64 px" in out.read_text()


def test_precision_check_compares_against_float32(tmp_path):
    check = load_script("precision_check")
    out = tmp_path / "precision.md"
    args = ["--model", "tiny", "--steps", "2", "--inner-steps", "2", "--photos", "2", "--scenes", "1",
            "--precisions", "bf16,tf32", "--out", str(out)]
    assert check.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["results"]) == ["float32", "bf16", "tf32"] and len(data["ids"]) == 3
    fp32, bf16 = data["results"]["float32"], data["results"]["bf16"]
    assert fp32["delta_db"] == 0 and len(bf16["psnr"]) == 3
    expected = sum(bf16["psnr"]) / 3 - sum(fp32["psnr"]) / 3
    assert bf16["delta_db"] == pytest.approx(expected)
    assert bf16["within_tolerance"] == (abs(expected) <= 0.1)
    assert data["results"]["tf32"]["within_tolerance"] is None  # a CPU cannot test TF32
    assert "| bf16 |" in out.read_text() and "not tested (no TF32 on a CPU)" in out.read_text()
