"""Bad settings stop every command with one line before any model loads (issue: no traceback from the command line).

The property-based test composes the real configs of every app with random overrides and runs
each app's settings check (``nulltext.cli.SETTING_CHECKS``: the first step of its task function)
through the CLI's own error wrapper. Each example must either pass the check or end with exactly
one ``nulltext: error:`` line and exit status 2, never a traceback.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from helpers import composed, run_nulltext
from nulltext.apps import report_errors
from nulltext.cli import CONFIG_DIR, SETTING_CHECKS
from nulltext.errors import user_error
from nulltext.errors import NulltextError
from nulltext.validation import SettingError, check_multiple

CONF = Path(CONFIG_DIR)
ARTIFACT = "run/inversions/cat.safetensors"  # the checks run before any file is read
BASE = {
    "config": ["model=tiny"],
    "edit": ["model=tiny", 'prompts=["a photo of a dog"]', "image=cat.png", "caption=a photo of a cat"],
    "attention": [f"artifact={ARTIFACT}"],
    "edit_bench": ["model=tiny"],
    "reconstruct": [f"artifact={ARTIFACT}"],
}
# Config groups of `nulltext` drawn per example (model stays tiny: nothing big may load).
GROUPS = ("data", "inversion", "diffusion", "trainer", "logger")
# Not drawn: Hydra's and the output paths, the random-init model's architecture (a developer's
# config, not a user setting), logger constructor arguments (names and folders, any text goes),
# Lightning's switches that the configs fix, and the ablation budgets (read only by experiments).
SKIPPED = ("hydra", "paths", "model", "logger", "task_name", "ablation", "trainer.default_root_dir", "trainer.enable_")

BAD = ["0", "-1", "-1000000", "1000000000000", "nan", "inf", "-inf", "abc", "''", "no_such_name", "null", "[]", "true", "1.5", "[abc]", "[-1,nan]"]


# The data configs that need files: a one-photo folder and a one-image COCO beside it (tmp folder).
DATA_FOLDERS = {"folder": {"data.dataset.path": "photos"}, "coco": {"data.dataset.root": "coco", "data.dataset.num_images": 1}}


def make_data_folders(folder: Path) -> None:
    photos, coco = folder / "photos", folder / "coco"
    (coco / "val2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    photos.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photos / "red.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(coco / "val2017" / "000000000001.jpg")
    (photos / "captions.csv").write_text("image,caption\nred.png,a red square\n")
    (coco / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}]})
    )


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def leaf_settings(cfg) -> dict:
    """Dotted key -> default value of every overridable leaf (lists count as leaves)."""
    found = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if str(key).startswith("_") or name.startswith(SKIPPED):
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                found[name] = value

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def override_value(default):
    """Hydra override text drawn for a setting whose default is ``default``: a usual value of its type,
    one of the bad values of every kind (zero, negative, huge, nan, inf, wrong type, empty, unknown
    name), or any value of its type."""
    if isinstance(default, bool):
        usual = wild = st.sampled_from(["true", "false"])
    elif isinstance(default, int):
        usual, wild = st.integers(1, 64).map(str), st.integers(-(2**40), 2**40).map(str)
    elif isinstance(default, float):
        usual = st.floats(0.0, 1.0).map(repr)
        wild = st.floats(allow_nan=True, allow_infinity=True).map(lambda x: "nan" if math.isnan(x) else repr(x))
    elif isinstance(default, list):
        usual = st.just(f"[{','.join(map(str, default))}]")
        wild = st.lists(st.sampled_from(["0", "1.0", "abc", "''", "nan"]), max_size=3).map(lambda xs: f"[{','.join(xs)}]")
    elif isinstance(default, str):
        usual, wild = st.just(f"'{default}'"), st.sampled_from(["''", "no_such_name", "'two words'"])
    else:  # null: the feature is off by default
        usual, wild = st.just("null"), st.sampled_from(["''", "no_such_name", "1"])
    return st.one_of(usual, st.sampled_from(BAD), wild)


def setting_fields(folder: Path) -> dict:
    """(app, group, option) -> {setting: default}, composed once per app and per config group option
    (``(app, None, None)``: the app's own top-level settings)."""
    fields = {}
    for app in BASE:
        with composed(app, BASE[app], folder / "out") as cfg:
            fields[app, None, None] = {k: v for k, v in leaf_settings(cfg).items() if app != "config" or not k.startswith(GROUPS)}
    for group in GROUPS:
        for option in options(group):
            with composed("config", [*BASE["config"], f"{group}={option}"], folder / "out") as cfg:
                fields["config", group, option] = {k: v for k, v in leaf_settings(cfg).items() if k.startswith(group + ".")}
    return fields


@st.composite
def examples(draw, folder: Path, fields: dict):
    """(app, overrides): an app, its config groups drawn (for `nulltext`), then 1 to 3 settings overridden."""
    app = draw(st.sampled_from(sorted(BASE)))
    overrides = list(BASE[app])
    candidates = dict(fields[app, None, None])
    if app == "config":
        for group in GROUPS:
            option = draw(st.sampled_from(options(group)))
            overrides.append(f"{group}={option}")
            candidates.update(fields[app, group, option])
            if group == "data" and option in DATA_FOLDERS:
                overrides += [f"{key}={folder / value}" if key.endswith(("path", "root")) else f"{key}={value}" for key, value in DATA_FOLDERS[option].items()]
    for key in draw(st.lists(st.sampled_from(sorted(candidates)), min_size=1, max_size=2, unique=True)):
        overrides.append(f"{key}={draw(override_value(candidates[key]))}")
    return app, overrides


def run_check(app: str, overrides: list[str], output_dir: Path) -> tuple[str, str]:
    """Compose and run the app's settings check as the CLI does: ("starts" or "error", stderr)."""
    stderr = io.StringIO()
    with composed(app, overrides, output_dir) as cfg, contextlib.redirect_stderr(stderr):
        try:
            report_errors(SETTING_CHECKS[app])(cfg)
            outcome = "starts"
        except SystemExit as exit_:
            assert exit_.code == 2, (overrides, exit_.code)
            outcome = "error"
    return outcome, stderr.getvalue()


def test_random_bad_settings_start_or_give_one_error_line(tmp_path, capsys):
    folder = tmp_path / "data"
    make_data_folders(folder)
    fields = setting_fields(folder)
    tried = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(examples(folder, fields))
    def check(example):
        app, overrides = example
        outcome, stderr = run_check(app, overrides, tmp_path / "run")
        errors = [line for line in stderr.splitlines() if line.startswith("nulltext: error:")]
        assert "Traceback" not in stderr, (overrides, stderr)
        assert len(errors) == (1 if outcome == "error" else 0), (overrides, stderr)
        tried.append(f"{outcome:6} nulltext {app if app != 'config' else ''} {' '.join(overrides)}" + (f"\n         -> {errors[0]}" if errors else ""))

    check()
    with capsys.disabled():
        print(f"\n{len(tried)} settings examples tried (starts = passed every check):")
        print("\n".join(tried))
    # Both outcomes occur: the draws reach bad values and values every check accepts.
    assert any(t.startswith("starts") for t in tried) and any(t.startswith("error") for t in tried)


@pytest.mark.parametrize(
    "args, message",
    [
        (["diffusion.num_inference_steps=0", "data.limit=1"], "diffusion.num_inference_steps=0 is not allowed: an integer >= 1 and <= 999"),
        (["inversion.learning_rate=nan"], "inversion.learning_rate=nan is not allowed: a finite number > 0"),
        (["data.resolution=7"], "data.resolution=7 is not allowed: a multiple of 4"),
        (["seed=-5"], "seed=-5 is not allowed: an integer >= 0 and <= 4294967295"),
        (["inversion.num_inner_steps=-1"], "inversion.num_inner_steps=-1 is not allowed: an integer >= 1"),
        (["diffusion.guidance_scale=abc"], "diffusion.guidance_scale='abc' is not allowed: a finite number"),
    ],
)
def test_the_reported_bad_settings_give_one_line_from_the_command_line(tmp_path, args, message):
    """The issue's six commands, as typed (the shipped pocket model): one line, exit 2, nothing written."""
    result = run_nulltext(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("nulltext: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/**/metrics.json"))


def test_real_bugs_are_not_reported_as_user_errors(tmp_path):
    """Only NulltextErrors become one line; any other exception (a bug) keeps its traceback."""

    def buggy(cfg):
        raise ZeroDivisionError("a bug")

    with composed("config", ["model=tiny"], tmp_path) as cfg, pytest.raises(ZeroDivisionError):
        report_errors(buggy)(cfg)
    wrapped = InstantiationException("Error in call to target")
    wrapped.__cause__ = ZeroDivisionError("a bug")
    assert user_error(wrapped) is None
    wrapped.__cause__ = SettingError("x=1 is not allowed")
    assert isinstance(user_error(wrapped), NulltextError)


def test_model_shape_comes_from_config_files_and_matches_the_loaded_model(tiny_pipe):
    from nulltext.models import ModelShape, model_shape, pipeline_shape
    from nulltext.pocket import load_pocket

    tiny = OmegaConf.load(CONF / "model" / "tiny.yaml")
    assert model_shape(tiny) == pipeline_shape(tiny_pipe) == ModelShape(vae_factor=4, resolution=64, max_steps=999)
    pocket = OmegaConf.load(CONF / "model" / "pocket.yaml")
    assert model_shape(pocket) == pipeline_shape(load_pocket())
    assert check_multiple("data.resolution", 64, 4) == 64
    for bad in (7, 2, 0, 66.0, "64"):
        with pytest.raises(SettingError, match="data.resolution="):
            check_multiple("data.resolution", bad, 4)
