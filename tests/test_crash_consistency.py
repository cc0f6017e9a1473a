"""A run killed with SIGKILL at any point, then rerun, ends exactly like an uninterrupted run, and
no kill ever leaves a half-written file that looks complete.

The kill points are found by watching the run from outside (its progress bar on stderr and its
output folder), with no hooks in the product code:

1. between images: as soon as the bar reports the first image done;
2. inside an image: on the rerun, as soon as its log says it began the second image (after reusing the first);
3. while writing an image's outputs: the first temporary file or PNG of the second image;
4. while writing the summary: the first sight of metrics.json or its temporary file.
"""

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import FAST, nulltext_command
from nulltext.artifacts import load_artifact
from nulltext.data import SAMPLE_IDS

IDS = list(SAMPLE_IDS[:3])
COMMAND = [
    *FAST,
    "inversion=null_text",
    "inversion.num_inner_steps=2",
    f"data.limit={len(IDS)}",
    "trainer.enable_progress_bar=true",  # the test reads it to know where the run is
]
BAR = re.compile(rb"\| (\d+)/(\d+) \[")


class Run:
    """``nulltext`` in a subprocess; threads follow the images-done count on its progress bar (stderr)
    and its log (stdout)."""

    def __init__(self, run_dir: Path, cwd: Path):
        command, env = nulltext_command(*COMMAND, f"hydra.run.dir={run_dir}")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.images_done = -1  # -1: the bar has not appeared yet
        self.stderr = b""
        self.stdout = b""
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True) for stream in ("stderr", "stdout")]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: str) -> None:
        while chunk := getattr(self.process, stream).read1(65536):
            with self._changed:
                setattr(self, stream, getattr(self, stream) + chunk)
                counts = BAR.findall(self.stderr[-4096:])
                if counts:
                    self.images_done = int(counts[-1][0])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, reached, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: reached() or self.process.poll() is not None, timeout)
            assert reached(), (self.stdout + self.stderr)[-3000:].decode(errors="replace")

    def wait_for_images(self, n: int, timeout: float = 600) -> None:
        self._wait(lambda: self.images_done >= n, timeout)

    def wait_for_log(self, text: str, timeout: float = 600) -> None:
        self._wait(lambda: text.encode() in self.stdout, timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        for reader in self._readers:
            reader.join()

    def finish(self) -> str:
        assert self.process.wait(timeout=600) == 0, self.stderr[-3000:].decode(errors="replace")
        for reader in self._readers:
            reader.join()
        return self.stdout.decode()


def kill_when(run: Run, appeared, timeout: float = 600) -> None:
    """SIGKILL ``run`` the moment ``appeared()`` is true (polled as fast as Python can)."""
    deadline = time.monotonic() + timeout
    while not appeared():
        assert run.process.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline
    run.kill()


def temporaries(run_dir: Path) -> set[Path]:
    """Files of atomic writes cut short: hidden and named .tmp, so they look unfinished."""
    return set(run_dir.rglob(".*.tmp"))


def visible_files(run_dir: Path) -> list[Path]:
    files = (p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
    return sorted(p for p in files if not any(part.startswith(".") for part in p.parts))


def without_run_specifics(value, run_dir: Path):
    """JSON content with timings and peak memory (measured, so never equal twice) and the file's
    checksum (of content with them) dropped, and the run folder's path made neutral."""
    if isinstance(value, dict):
        measured = ("seconds", "seconds_mean", "peak_memory_mib", "peak_memory_mib_mean", "sha256")
        return {k: without_run_specifics(v, run_dir) for k, v in value.items() if k not in measured}
    if isinstance(value, list):
        return [without_run_specifics(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(str(run_dir), "<run>")
    return value


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_same_image_outputs(run_dir: Path, reference: Path, image_id: str) -> None:
    ours, theirs = (d / "inversions" / f"{image_id}.safetensors" for d in (run_dir, reference))
    a, b = load_file(str(ours)), load_file(str(theirs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), image_id
    ours, theirs = (json.loads((d / "inversions" / f"{image_id}.json").read_text()) for d in (run_dir, reference))
    assert without_run_specifics(ours, run_dir) == without_run_specifics(theirs, reference), image_id
    assert np.array_equal(pixels(run_dir / "images" / f"{image_id}.png"), pixels(reference / "images" / f"{image_id}.png"))


def assert_nothing_half_written(run_dir: Path, reference: Path) -> list[str]:
    """Every file that looks complete is complete and consistent; returns the finished images."""
    for path in map(run_dir.joinpath, visible_files(run_dir)):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".png":
            pixels(path)
    finished = sorted(p.stem for p in (run_dir / "inversions").glob("*.json")) if (run_dir / "inversions").exists() else []
    for image_id in finished:
        # The artifact JSON marks an image complete: all its files are there, and are the final ones.
        load_artifact(run_dir / "inversions" / f"{image_id}.json")
        assert_same_image_outputs(run_dir, reference, image_id)
    if (run_dir / "metrics.json").exists():
        assert finished == sorted(IDS)
    return finished


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    Run(reference, tmp_path).finish()
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    assert [r["id"] for r in ref_metrics["images"]] == IDS and ref_metrics["num_failed"] == 0

    run_dir = tmp_path / "run"
    # 1. Between images: the first image is done (the bar moves after its files are written).
    run = Run(run_dir, tmp_path)
    run.wait_for_images(1)
    run.kill()
    assert assert_nothing_half_written(run_dir, reference) == sorted(IDS[:1])

    # 2. Inside an image: the rerun reuses the first image at once, then works on the second.
    run = Run(run_dir, tmp_path)
    run.wait_for_log(f"inverting {IDS[1]}")
    run.kill()
    assert assert_nothing_half_written(run_dir, reference) == sorted(IDS[:1])

    # 3. While writing the second image's outputs (PNG, then tensors, then the artifact JSON).
    second_png = run_dir / "images" / f"{IDS[1]}.png"
    left_before = temporaries(run_dir)
    run = Run(run_dir, tmp_path)
    kill_when(run, lambda: second_png.exists() or bool(temporaries(run_dir) - left_before))
    print("killed while writing; files of", IDS[1], sorted(p.name for p in run_dir.rglob(f"*{IDS[1]}*")))
    assert set(assert_nothing_half_written(run_dir, reference)) <= set(IDS[:2])

    # 4. While writing metrics.json (or just after, if the write was quicker than the poll).
    metrics = run_dir / "metrics.json"
    run = Run(run_dir, tmp_path)
    kill_when(run, lambda: metrics.exists() or any(p.name.startswith(".metrics.json.") for p in run_dir.iterdir()))
    print("killed while writing the summary:", sorted(p.name for p in run_dir.glob("*metrics.json*")))
    assert_nothing_half_written(run_dir, reference)

    # The last rerun finishes; every image is the uninterrupted run's, bit for bit.
    stdout = Run(run_dir, tmp_path).finish()
    assert assert_nothing_half_written(run_dir, reference) == sorted(IDS)
    assert stdout.count("reusing the stored result") == len(IDS)
    assert f"taking over the lock of {run_dir}" in stdout, "the killed run's lock did not stop the rerun"
    assert without_run_specifics(json.loads(metrics.read_text()), run_dir) == without_run_specifics(ref_metrics, reference)
    # The same files (csv/ aside: Lightning's log of what each process itself computed).
    outputs = lambda d: [p for p in visible_files(d) if p.parts[0] != "csv"]  # noqa: E731
    assert outputs(run_dir) == outputs(reference)


@pytest.mark.slow
def test_sigterm_during_a_jobs_last_image_ends_the_sweep_after_that_image(tmp_path):
    # Lightning alone would finish the job (the signal came with its last image) and the next job's
    # fresh trainer would forget the signal: the sweep would go on.
    sweep = tmp_path / "sweep"
    command, env = nulltext_command(
        "-m", *FAST, "inversion=null_text", "inversion.num_inner_steps=5,1", "data.limit=1",
        "trainer.enable_progress_bar=true", f"hydra.sweep.dir={sweep}",
    )
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"0/1 [" not in seen:  # the bar of job 0: its trainer (and signal handler) is running
        chunk = process.stderr.read1(65536)
        assert chunk, seen[-3000:].decode(errors="replace")
        seen += chunk
    process.send_signal(signal.SIGTERM)
    seen += process.stderr.read()
    assert process.wait(timeout=600) == 143, seen[-3000:].decode(errors="replace")
    resume = f"nulltext: stopped by SIGTERM; to resume, run the same command with hydra.sweep.dir={sweep.resolve()} (finished images are kept)"
    assert seen.decode().strip().splitlines()[-1] == resume
    assert json.loads((sweep / "0_null_text" / "metrics.json").read_text())["num_images"] == 1
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == ["0_null_text"]
