"""Every command of the README runs as written, in its order, on the shipped model and sample photos.

The commands are read from the README itself: the lines of its code blocks that start with
``nulltext`` (continuation lines joined, comments dropped) and the inline ones that carry settings.
Placeholders get what the earlier commands made (``<date>``: the run folder of the command that wrote
it, ``artifact=...``: the artifact named before) and ``photo.jpg`` is a sample photo. To keep the
test within minutes, settings that only set the amount of work are appended to each command (2
sampling steps, 2 images, 1 edit case): every app, experiment, sweep and path runs as written.

A command that needs what an offline CPU machine lacks (a hub model, COCO, a GPU) must fail at once
with one clear line: :data:`EXPECTED_FAILURES` names each and its message. The Python example runs
as written (it fails in one line: SD 1.4 is not cached) and with the shipped model. (The ``make``
targets are these commands; ``make test`` runs this test.)
"""

import re
import shlex
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_nulltext
from nulltext.cli import SUBCOMMANDS
from nulltext.data import SampleImages
from nulltext.errors import ModelUnavailableError

README = Path(__file__).resolve().parents[1] / "README.md"

# A distinctive part of the command -> the message of its one error line.
EXPECTED_FAILURES = {
    "data.dataset.path=my_photos": "data folder not found: my_photos",
    "data.dataset.root=/data/coco": "COCO root not found: /data/coco",
    "nulltext report outputs/fig4": "outputs/fig4",  # the sweep above could not run without COCO
    "trainer=gpu": "the trainer settings cannot run here",
}
# Appended to a command of each app: the amount of work only.
LESS_WORK = {
    "invert": ["diffusion.num_inference_steps=2", "ablation.global_passes=2", "ablation.denoising_iterations=4", "ablation.report_every=2"],
    "edit": ["diffusion.num_inference_steps=2"],
    "edit_bench": ["diffusion.num_inference_steps=2", "num_cases=1"],
}


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.sub(r"\\\n\s*", "", text)  # continuation lines
    commands = [line.strip() for line in blocks.splitlines() if line.startswith("    nulltext")]
    inline = [span for span in re.findall(r"`(nulltext [^`]*)`", text) if "=" in span or " -" in span]
    return commands + [span for span in inline if span not in commands]


def python_example() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def with_placeholders(command: str, cwd: Path, artifact: str | None) -> str:
    def run_folder(match):
        # The first run folder holding the file the command names (commands that failed left folders
        # too; later commands of the README invert the same photos with other models).
        file = match.group(2) or ""
        folders = [f for f in (cwd / "outputs" / match.group(1) / "runs").iterdir() if (f / (file[1:] or "inversions")).exists()]
        return str(min(folders).relative_to(cwd)) + file

    command = re.sub(r"outputs/(\w+)/runs/<date>(/inversions/[\w.-]+)?", run_folder, command)
    return command.replace("artifact=...", f"artifact={artifact}") if artifact else command


def app_of(args: list[str]) -> str:
    return args[1] if len(args) > 1 and args[1] in (*SUBCOMMANDS, "report") else "invert"


@pytest.mark.slow
def test_every_readme_command_runs_as_written_or_fails_in_one_clear_line(tmp_path):
    commands = readme_commands()
    assert len(commands) > 20 and any("nulltext edit artifact=" in c for c in commands)
    cat = SampleImages(resolution=256, names=["cat"])[0]["image"]
    Image.fromarray(cat.permute(1, 2, 0).numpy()).save(tmp_path / "photo.jpg")
    artifact = None
    for command in commands:
        command = with_placeholders(command, tmp_path, artifact)
        args = shlex.split(command, comments=True)
        artifact = next((a.split("=", 1)[1] for a in args if a.startswith("artifact=")), artifact)
        app = app_of(args)
        extra = LESS_WORK.get(app, [])
        if app == "invert" and not any(a.startswith("data.limit=") for a in args):
            extra = [*extra, "data.limit=2"]  # the edits below use the second photo; random_caption needs 2
        started = time.monotonic()
        result = run_nulltext(*args[1:], *extra, cwd=tmp_path)
        print(f"{time.monotonic() - started:5.1f} s  {command}")
        output = result.stdout + result.stderr
        assert "Traceback" not in output, (command, output[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("nulltext: error:")]
        expected = next((message for part, message in EXPECTED_FAILURES.items() if part in command), None)
        if expected is None:
            assert result.returncode == 0 and not errors, (command, output[-3000:])
        else:
            # Every job of a sweep reports the same line, then the sweep's line lists the failed jobs.
            job_errors = [line for line in errors if " job(s) failed: " not in line]
            assert job_errors and len(set(job_errors)) == 1 and expected in job_errors[0], (command, output[-3000:])
            assert result.returncode == 2, (command, output[-3000:])
    assert all(any(part in c for c in commands) for part in EXPECTED_FAILURES), "an entry for a command no longer in the README"


def test_the_python_example_runs_as_written_and_on_the_shipped_model(tmp_path, monkeypatch):
    example = python_example()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelUnavailableError) as error:  # offline, SD 1.4 not cached
        exec(example, {})
    assert "\n" not in str(error.value)
    cat = SampleImages(resolution=256, names=["cat"])[0]["image"]
    Image.fromarray(cat.permute(1, 2, 0).numpy()).save(tmp_path / "cat.jpg")
    names = {}
    exec(example.replace('load_pipeline("sd14")', 'load_pipeline("pocket")'), names)
    result = names["result"]
    assert result.null_embeddings.shape[0] == 50 and result.reconstruction.size == (64, 64)
    assert set(result.metrics) == {"psnr", "lpips", "ssim", "vae_psnr", "iterations", "seconds", "lpips_spec"}
