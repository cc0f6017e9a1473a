"""Bad input, files and folders: nothing silently wrong, nothing lost (issue 20, part A).

Every file nulltext reads back (inversion artifacts, metrics.json, edit_bench.json, a model
folder's configs) is checked when read: a missing or damaged one stops the command with one line
naming it and exit status 2, never a traceback and never a result. Artifacts record checksums of
their tensors and of their JSON, and their tensors are checked against the model that will use
them. Written files honour the umask; unwritable output folders give one line; a run whose every
image failed, and a multirun with a failed job, exit with status 2. The property-based test
damages artifact and metrics files at random.
"""

import hashlib
import io
import json
import os
import shutil
import stat
import sys
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from helpers import FAST, composed, run_nulltext
from nulltext import api
from nulltext.artifacts import FORMAT_VERSION, artifact_files, load_artifact, save_artifact
from nulltext.cli import main, prepare_inversion, run_inversion, run_reconstruction
from nulltext.errors import FileError, ModelUnavailableError, NulltextError
from nulltext.io import CHECKSUM, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a photo of a cat"
STEPS = 4
TINY = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml"))
POCKET = {"_target_": "nulltext.pocket.load_pocket"}
SAMPLER = {"_target_": "nulltext.diffusion.Diffusion", "num_inference_steps": STEPS, "guidance_scale": 7.5, "inversion_timestep": "target"}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("nulltext: error:")]


def one_error(result, *names) -> str:
    """The single error line of a finished command (status 2, no traceback), which names ``names``."""
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def exit_with_one_line(task) -> str:
    """Run a command's task through the command line's error handling: status 2 and one line."""
    stderr = io.StringIO()
    with redirect_stderr(stderr), pytest.raises(SystemExit) as stopped:
        task()
    assert stopped.value.code == 2
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nulltext: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def inversion(tiny_pipe, sample_images):
    """A real null-text inversion of one photo on the tiny model (one inner step per timestep)."""
    image = Image.fromarray(sample_images[1].permute(1, 2, 0).numpy())
    return api.invert(tiny_pipe, image, CAPTION, num_inference_steps=STEPS, num_inner_steps=1).inversion


def write_artifact(folder: Path, inversion, model: dict = TINY, name: str = "cat") -> Path:
    stem = folder / "inversions" / name
    save_artifact(stem, inversion, {"id": name, "model_config": model, "diffusion_config": SAMPLER})
    return stem.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def artifact(inversion, tmp_path_factory) -> Path:
    return write_artifact(tmp_path_factory.mktemp("run"), inversion)


@pytest.fixture
def copy(artifact, tmp_path):
    """A fresh copy of the artifact's two files in this test's folder."""
    for file in artifact_files(artifact):
        shutil.copy(file, tmp_path / file.name)
    return tmp_path / artifact.name


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x40  # in the tensor data: the safetensors header stays intact
    file.write_bytes(bytes(data))


def rewrite_record(file: Path, **changes) -> None:
    """The artifact's JSON with ``changes``, and a checksum that fits them (as another tool would write it)."""
    record = {k: v for k, v in json.loads(file.read_text()).items() if k != CHECKSUM}
    atomic_write_json(file, {**record, **changes})


# --- Artifacts: checksums, finite values, shapes against the model (item 1) ---------------------


def test_an_artifact_records_checksums_of_its_tensors_and_of_its_record(artifact):
    tensors, record = artifact_files(artifact)
    saved = json.loads(record.read_text())
    assert saved["format_version"] == FORMAT_VERSION == 2
    assert saved["tensors_sha256"] == hashlib.sha256(tensors.read_bytes()).hexdigest()
    canonical = json.dumps({k: v for k, v in saved.items() if k != CHECKSUM}, sort_keys=True, separators=(",", ":"))
    assert saved[CHECKSUM] == hashlib.sha256(canonical.encode()).hexdigest()
    assert CHECKSUM not in load_artifact(artifact)[1], "the record is returned without its checksum"


@pytest.mark.parametrize("command", ["reconstruct", "edit"])
def test_flipped_tensor_bytes_stop_the_command_with_one_line(copy, tmp_path, command):
    """The issue's case: damaged tensor data, header intact, gave a black picture and a perfect score."""
    flip_last_byte(copy)
    args = [f"artifact={copy}", f"hydra.run.dir={tmp_path / 'out'}"]
    if command == "edit":
        args.append('prompts=["a photo of a dog"]')
    result = run_nulltext(command, *args, cwd=tmp_path)
    line = one_error(result, copy)
    assert "do not match the checksum" in line
    assert not list((tmp_path / "out").glob("*.png")), "no result from a damaged artifact"


def damage_missing_artifact(copy):
    return copy.with_name("dog.safetensors"), "artifact {given} not found"


def damage_missing_record(copy):
    copy.with_suffix(".json").unlink()
    return copy, "cat.json is missing"


def damage_missing_tensors(copy):
    copy.unlink()
    return copy.with_suffix(".json"), "cat.safetensors are missing"


def damage_truncated_tensors(copy):
    copy.write_bytes(copy.read_bytes()[:100])
    return copy, "cat.safetensors is damaged (its bytes do not match the checksum"


def damage_garbage_tensors(copy):
    copy.write_bytes(os.urandom(2000))
    return copy, "cat.safetensors is damaged (its bytes do not match the checksum"


def damage_truncated_record(copy):
    record = copy.with_suffix(".json")
    record.write_text(record.read_text()[:200])
    return copy, "cat.json is damaged (not JSON"


def damage_empty_object(copy):
    copy.with_suffix(".json").write_text("{}")
    return copy, "cat.json is damaged ('format_version' is missing"


def damage_list(copy):
    copy.with_suffix(".json").write_text("[]")
    return copy, "cat.json is damaged (a JSON list where an object is expected)"


def damage_changed_value(copy):
    record = copy.with_suffix(".json")
    record.write_text(record.read_text().replace('"guidance_scale": 7.5', '"guidance_scale": 7.1'))
    return copy, "cat.json is damaged (its content does not match the checksum it records)"


def damage_wrong_type(copy):
    rewrite_record(copy.with_suffix(".json"), prompt=["a", "list"])
    return copy, "cat.json is damaged ('prompt' is"


def damage_tensors_that_are_not_safetensors(copy):
    data = os.urandom(500)
    copy.write_bytes(data)
    rewrite_record(copy.with_suffix(".json"), tensors_sha256=hashlib.sha256(data).hexdigest())
    return copy, "cat.safetensors is damaged (not a safetensors file"


def damage_checksum_removed(copy):
    record = copy.with_suffix(".json")
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != CHECKSUM}))
    return copy, "cat.json records no checksum (damaged, or written by a nulltext from before the checksums)"


def damage_no_model(copy):
    record = copy.with_suffix(".json")
    rewrite_record(record, model_config=None)
    return copy, "cat.json is damaged ('model_config' is null, not an object)"


@pytest.mark.parametrize("damage", [d for name, d in sorted(globals().items()) if name.startswith("damage_")])
def test_missing_and_damaged_artifacts_name_the_file(copy, tmp_path, damage):
    given, message = damage(copy)
    with composed("reconstruct", [f"artifact={given}"], tmp_path / "out") as cfg, pytest.raises(FileError) as error:
        run_reconstruction(cfg)
    assert message.format(given=given) in str(error.value)
    assert "\n" not in str(error.value)


def test_non_finite_tensors_are_refused(inversion, tmp_path):
    broken = inversion.select(0)
    broken.uncond = broken.uncond.clone()
    broken.uncond[0, 1, 2, 3] = float("nan")
    path = write_artifact(tmp_path, broken)
    with pytest.raises(FileError, match=r"cat.safetensors is damaged \(uncond has 1 values that are not finite\)"):
        api.reconstruct_artifact(path)


def test_tensors_that_do_not_fit_the_recorded_model_are_one_line(copy):
    """The issue's case: tiny tensors with a pocket JSON gave a `mat1 and mat2` traceback."""
    rewrite_record(copy.with_suffix(".json"), model_config=POCKET)
    with pytest.raises(FileError, match=r"cat.json does not fit its own model and sampler: uncond is \[4, 77, 32\], .*\[4 or 1, 77, 64\]"):
        api.reconstruct_artifact(copy)


def test_artifacts_without_checksums_are_read_with_a_warning_line(copy, artifact, caplog):
    """Format 1 (before the checksums): read as before, with one warning line naming the file."""
    record = copy.with_suffix(".json")
    old = {k: v for k, v in json.loads(record.read_text()).items() if k not in (CHECKSUM, "tensors_sha256")}
    atomic_write_text(record, json.dumps({**old, "format_version": 1}))
    expected = np.asarray(api.reconstruct_artifact(artifact))
    caplog.clear()
    assert np.array_equal(np.asarray(api.reconstruct_artifact(copy)), expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("nulltext")]
    assert len(warnings) == 1 and str(record) in warnings[0] and "no checksum" in warnings[0]


def test_a_model_given_on_the_command_line_is_used_if_it_fits_or_refused(artifact, tmp_path, caplog):
    from nulltext.editing.cli import run_edit

    def edit(*overrides):
        args = [f"artifact={artifact}", 'prompts=["a photo of a dog"]', *overrides]
        with composed("edit", args, tmp_path / "_".join(overrides or ["own"])) as cfg:
            run_edit(cfg)
        settings_file = json.loads((tmp_path / "_".join(overrides or ["own"]) / "settings.json").read_text())
        return np.asarray(Image.open(tmp_path / "_".join(overrides or ["own"]) / "reconstruction.png")), settings_file

    own, _ = edit()
    same, _ = edit("model=tiny")  # the artifact's own model given again: nothing replaced
    assert np.array_equal(same, own) and not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("nulltext")]
    other, recorded = edit("model=tiny", "model.seed=1")  # same shapes, other weights: used, and said so
    assert not np.array_equal(other, own)
    assert recorded["model_config"]["seed"] == 1, "settings.json names the model used"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("nulltext")]
    assert len(warnings) == 1 and "records another model (differing in seed): using the one given" in warnings[0]
    with pytest.raises(FileError, match=r"cat.json does not fit the model given: uncond is \[4, 77, 32\]"):
        edit("model=pocket")
    with pytest.raises(FileError, match=r"does not fit the sampler given: uncond is \[4, 77, 32\], .*\[5 or 1, 77, 32\]"):
        edit("diffusion.num_inference_steps=5")


def test_a_damaged_mask_is_one_line(artifact, tmp_path):
    from nulltext.editing.cli import run_edit
    from nulltext.editing.errors import EditError

    (tmp_path / "mask.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    args = [f"artifact={artifact}", 'prompts=["a photo of a dog"]', f"mask={tmp_path / 'mask.png'}"]
    with composed("edit", args, tmp_path / "out") as cfg, pytest.raises(EditError, match=f"cannot read mask {tmp_path / 'mask.png'}: "):
        run_edit(cfg)


def test_a_resumed_run_recomputes_an_image_whose_artifact_is_damaged(tmp_path, caplog):
    overrides = [*FAST, "inversion=ddim", "data.limit=2"]
    with composed("config", overrides, tmp_path) as cfg:
        first = run_inversion(cfg)
    flip_last_byte(tmp_path / "inversions" / "cat.safetensors")
    (tmp_path / "inversions" / "astronaut.json").write_text("{")
    caplog.clear()
    with composed("config", overrides, tmp_path) as cfg:
        second = run_inversion(cfg)
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "recomputing" in r.getMessage())
    assert len(warnings) == 2 and "astronaut.json is damaged" in warnings[0] and "cat.safetensors is damaged" in warnings[1]
    assert [r["psnr"] for r in second["images"]] == [r["psnr"] for r in first["images"]]
    for image_id in ("astronaut", "cat"):
        load_artifact(tmp_path / "inversions" / f"{image_id}.json")  # both rewritten whole


# --- Exit status (item 3) -----------------------------------------------------------------------


def test_a_run_whose_every_image_failed_exits_with_status_2(tmp_path):
    photos = tmp_path / "photos"  # given relative to the working directory
    photos.mkdir()
    (photos / "captions.csv").write_text("image,caption\nnone.png,a missing photo\nbroken.png,a broken file\n")
    (photos / "broken.png").write_bytes(b"not a picture")
    result = run_nulltext(*FAST, "inversion=ddim", "data=folder", "data.dataset.path=photos", "hydra.run.dir=run", cwd=tmp_path)
    one_error(result, "every image of the run failed (2; none: image not found", tmp_path / "run" / "metrics.json")
    assert "0 (2 failed)" in result.stdout, "the table still prints"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_failed"] == 2


def test_a_multirun_with_a_failed_job_prints_its_summary_and_exits_with_status_2(tmp_path):
    result = run_nulltext("-m", *FAST, "inversion=ddim,vae", "data.limit=1", "diffusion.guidance_scale=1,nan", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert sum("diffusion.guidance_scale=nan is not allowed" in line for line in errors) == 2
    assert errors[-1] == "nulltext: error: 2 job(s) failed: 1_ddim, 3_vae (their errors are above)"
    summary = result.stdout.splitlines()[-4:]
    assert summary[0].startswith("method") and [line.split()[0] for line in summary[2:]] == ["ddim", "vae"]


# --- Written files honour the umask (item 4) ----------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask 022", "umask 027"])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with composed("config", [*FAST, "inversion=ddim", "data.limit=1"], tmp_path) as cfg:
            run_inversion(cfg)
    finally:
        os.umask(old)
    written = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert {"metrics.json", "images/astronaut.png", "inversions/astronaut.json", "inversions/astronaut.safetensors"} <= set(written)
    assert set(written.values()) == {mode}, written


# --- Every file read, and every folder written (item 5) -----------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two finished jobs, as a multirun leaves them."""
    folder = tmp_path_factory.mktemp("sweep")
    for n, method in enumerate(("ddim", "vae")):
        with composed("config", [*FAST, f"inversion={method}", "data.limit=2"], folder / f"{n}_{method}") as cfg:
            run_inversion(cfg)
    return folder


METRICS_DAMAGES = {
    "truncated": (lambda text: text[: len(text) // 2], "is damaged (not JSON"),
    "garbage": (lambda text: "\x00\x01garbage", "is damaged (not JSON"),
    "empty object": (lambda text: "{}", "is damaged ('method' is missing"),
    "list": (lambda text: "[]", "is damaged (a JSON list where an object is expected)"),
    "no checksum": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != CHECKSUM}), "records no checksum"),
    "changed value": (lambda text: text.replace('"num_failed": 0', '"num_failed": 1'), "does not match the checksum"),
}


def test_report_on_a_truncated_metrics_json_names_the_file(sweep, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    metrics = folder / "0_ddim" / "metrics.json"
    metrics.write_text(metrics.read_text()[:300])
    result = run_nulltext("report", str(folder), cwd=tmp_path)
    assert "is damaged (not JSON" in one_error(result, metrics)
    assert not (folder / "report").exists()


@pytest.mark.parametrize("damage", sorted(METRICS_DAMAGES))
def test_report_on_a_damaged_metrics_json_names_the_file(sweep, tmp_path, monkeypatch, damage):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    metrics = folder / "0_ddim" / "metrics.json"
    change, message = METRICS_DAMAGES[damage]
    metrics.write_text(change(metrics.read_text()))
    monkeypatch.setattr(sys, "argv", ["nulltext", "report", str(folder)])
    line = exit_with_one_line(main)
    assert str(metrics) in line and message in line
    assert not (folder / "report").exists()


def test_report_on_a_damaged_edit_bench_json_names_the_file(sweep, tmp_path):
    from nulltext.report import main as report

    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    bench = folder / "edit_bench" / "edit_bench.json"
    atomic_write_json(bench, {"config": {}, "method_configs": {}, "summary": {}})
    bench.write_text(bench.read_text()[:30])
    with pytest.raises(FileError, match=r"edit_bench/edit_bench.json is damaged \(not JSON"):
        report([str(folder)])


def pocket_configs(folder: Path) -> Path:
    """The shipped model's config files (no weights): enough for the settings check of a model folder."""
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "models" / "pocket" / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("unet/config.json", "[]", "unet/config.json of model '{folder}' is damaged (a JSON list, not an object)"),
        ("unet/config.json", '{"sample_size": "big"}', "unet/config.json is damaged ('sample_size' is \"big\", not an integer or null)"),
        ("vae/config.json", '{"block_out_channels": 3}', "vae/config.json is damaged ('block_out_channels' is 3, not a list or null)"),
        ("scheduler/scheduler_config.json", "{", "cannot read {folder}/scheduler/scheduler_config.json of model '{folder}' (JSONDecodeError)"),
    ],
)
def test_damaged_configs_of_a_model_folder_name_the_file(tmp_path, name, content, message):
    folder = pocket_configs(tmp_path / "model")
    (folder / name).write_text(content)
    with composed("config", ["model=sd14", f"model.path={folder}"], tmp_path / "out") as cfg, pytest.raises(NulltextError) as error:
        prepare_inversion(cfg)
    assert message.format(folder=folder) in str(error.value)


def test_a_damaged_model_index_names_the_file(tmp_path):
    folder = pocket_configs(tmp_path / "model")
    (folder / "model_index.json").write_text("[]")
    with pytest.raises(ModelUnavailableError, match=r"model_index.json of model '.*' is damaged \(a JSON list, not an object\)"):
        api.load_pipeline(str(folder))


def blocked_run_folder(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "taken").write_text("a file")
    return str(tmp_path / "taken" / "run"), tmp_path / "taken"


def read_only_file_system(tmp_path: Path) -> tuple[str, Path]:
    return "/sys/nulltext-run", Path("/sys/nulltext-run")  # sysfs: not writable, not even by root


def read_only_folder(tmp_path: Path) -> tuple[str, Path]:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the sysfs case covers it)")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    return str(tmp_path / "locked" / "run"), tmp_path / "locked" / "run"


@pytest.mark.parametrize("folder", [blocked_run_folder, read_only_file_system, read_only_folder])
def test_output_folders_that_cannot_be_written_give_one_line(tmp_path, folder):
    run_dir, named = folder(tmp_path)
    result = run_nulltext(*FAST, "inversion=ddim", "data.limit=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    one_error(result, named, "cannot write into")


def test_a_file_where_a_folder_of_the_run_goes_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "images").write_text("a file")
    with composed("config", [*FAST, "inversion=ddim"], tmp_path) as cfg, pytest.raises(FileError) as error:
        prepare_inversion(cfg)
    assert f"{tmp_path / 'images'} is a file where a folder goes" in str(error.value)


# --- Damage at random (item 8) ------------------------------------------------------------------


JSON_TYPES = [None, True, 0, "x", [], {}]


def json_paths(value, path=()):
    """Every node below the root of a JSON value, as key / index paths."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield (*path, key)
        yield from json_paths(child, (*path, key))


def json_kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def canonical(text: str):
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return None


@st.composite
def damaged(draw, data: bytes, is_json: bool) -> bytes:
    """Truncation, one flipped bit, or (JSON files) a value replaced by one of another JSON type;
    never a change a reader could not see (the same content, e.g. a number's 'e' written 'E')."""
    kinds = ["truncate", "flip", *(["retype"] if is_json else [])]
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        damaged = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        position, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
        damaged = data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]
    else:
        document = json.loads(data)
        path = draw(st.sampled_from(list(json_paths(document))))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = draw(st.sampled_from([v for v in JSON_TYPES if json_kind(v) != json_kind(parent[path[-1]])]))
        damaged = json.dumps(document, indent=2).encode()
    if is_json:
        assume(canonical(damaged.decode("utf-8", "replace")) != canonical(data.decode()))
    return damaged


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.data())
def test_randomly_damaged_artifacts_give_one_line_and_no_result(artifact, tmp_path_factory, data):
    from nulltext.apps import report_errors

    folder = tmp_path_factory.mktemp("fuzz")
    files = {f.suffix: shutil.copy(f, folder / f.name) for f in artifact_files(artifact)}
    suffix = data.draw(st.sampled_from([".safetensors", ".json"]))
    target = Path(files[suffix])
    target.write_bytes(data.draw(damaged(target.read_bytes(), suffix == ".json")))
    cfg = OmegaConf.create({"artifact": str(folder / artifact.name), "paths": {"output_dir": str(folder / "out")}})
    line = exit_with_one_line(lambda: report_errors(run_reconstruction)(cfg))
    assert str(target) in line
    assert not (folder / "out").exists(), "no result"


@FUZZ
@given(st.data())
def test_randomly_damaged_metrics_give_one_line_and_no_report(sweep, tmp_path_factory, monkeypatch, data):
    folder = tmp_path_factory.mktemp("fuzz") / "sweep"
    shutil.copytree(sweep, folder)
    target = folder / data.draw(st.sampled_from(["0_ddim", "1_vae"])) / "metrics.json"
    target.write_bytes(data.draw(damaged(target.read_bytes(), True)))
    monkeypatch.setattr(sys, "argv", ["nulltext", "report", str(folder)])
    line = exit_with_one_line(main)
    assert str(target) in line
    assert not (folder / "report").exists(), "no report"
