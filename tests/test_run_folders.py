"""A run folder belongs to one run, interrupted runs say how to resume, and offline hub models and bad
data paths fail at once: through the real command line."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from helpers import FAST, nulltext_command, run_nulltext
from nulltext.folders import LOCK_FILE, FolderLock

QUICK = [*FAST, "diffusion.num_inference_steps=2", "inversion=ddim", "data.limit=1"]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("nulltext: error:")]


def test_a_busy_run_folder_is_refused_with_one_line_naming_it_and_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    with FolderLock(run_dir, "hydra.run.dir"):  # this process holds the folder, as a running nulltext would
        result = run_nulltext(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = error_lines(result)
    assert f"folder {run_dir} is in use by another run (pid {os.getpid()} on host" in line
    assert "give another hydra.run.dir=<folder>" in line and "Traceback" not in result.stderr
    assert not (run_dir / "inversions").exists() and not (run_dir / "metrics.json").exists()


def test_a_busy_sweep_folder_is_refused_before_it_writes_anything(tmp_path):
    sweep = tmp_path / "sweep"
    with FolderLock(sweep, "hydra.sweep.dir"):
        result = run_nulltext("-m", *QUICK, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert f"folder {sweep} is in use by another run" in line and "give another hydra.sweep.dir=<folder>" in line
    assert [p.name for p in sweep.iterdir()] == [LOCK_FILE], "no multirun.yaml, no job folder"


def test_the_sweep_summary_has_the_jobs_of_this_sweep_only(tmp_path):
    sweep = tmp_path / "sweep"
    # A job of an earlier sweep into the same folder (another method, another job number).
    (sweep / "1_negative_prompt").mkdir(parents=True)
    (sweep / "1_negative_prompt" / "metrics.json").write_text(json.dumps({"method": "negative_prompt", "num_images": 1}))
    result = run_nulltext("-m", *QUICK, "inversion=vae", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.split() and line.split()[0] in ("vae", "negative_prompt")]
    assert rows == ["vae", "vae"], result.stdout  # the job's own table, then the sweep's


@pytest.mark.slow
def test_two_identical_runs_at_once_compute_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    command, env = nulltext_command(*FAST, "inversion=null_text", "inversion.num_inner_steps=2", "data.limit=3", f"hydra.run.dir={run_dir}")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:  # the run's log: it holds the folder and has finished an image
        if "image astronaut: PSNR" in line:
            break
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, whatever the machine's load: still running for the second
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 2 and f"in use by another run (pid {first.pid} on host" in second.stderr
    assert "inverting" not in second.stdout, "the second run computed nothing"
    # A holder killed with SIGKILL cannot release its lock: the system does, and the next run takes it over.
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of {run_dir} (pid {first.pid} on host" in third.stdout
    assert "image astronaut: reusing the stored result" in third.stdout
    assert (run_dir / LOCK_FILE).read_text() == "", "a run that ends releases its lock"
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert sorted(row["step"] for row in rows if row.get("image/psnr")) == ["0", "1", "2"], "one CSV row per image"
    assert json.loads((run_dir / "metrics.json").read_text())["num_images"] == 3


def test_ctrl_c_names_the_override_that_resumes_the_run(tmp_path):
    # Default folders are named after the start time: the plain command again would start afresh.
    args = [*FAST, "inversion=null_text", "inversion.num_inner_steps=2", "data.limit=2"]
    command, env = nulltext_command(*args)
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; a test run started in
    # the background of a non-interactive shell (nohup ... &) hands SIG_IGN down, so reset it.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stdout = []
    for line in process.stdout:  # the run's log: the first image is done and the second begun
        stdout.append(line)
        if "inverting cat" in line:
            break
    else:
        pytest.fail("".join(stdout) + process.stderr.read())
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(timeout=600) == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    [run_dir] = (tmp_path / "outputs" / "invert" / "runs").iterdir()
    last = stderr.strip().splitlines()[-1]
    resume = f"hydra.run.dir={run_dir.resolve()}"
    assert last == f"nulltext: stopped by Ctrl-C; to resume, run the same command with {resume} (finished images are kept)"
    assert not (run_dir / "metrics.json").exists()

    result = run_nulltext(*args, *shlex.split(last.split(" with ")[1].split(" (")[0]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "image astronaut: reusing the stored result" in result.stdout and "inverting cat" in result.stdout
    assert [p.name for p in (tmp_path / "outputs" / "invert" / "runs").iterdir()] == [run_dir.name]
    assert json.loads((run_dir / "metrics.json").read_text())["num_images"] == 2
    # The run's log file holds both runs' lines (the app's own name, not the module's "cli").
    log = (run_dir / "nulltext.log").read_text()
    assert "image astronaut: PSNR" in log and "image astronaut: reusing the stored result" in log and "image cat: PSNR" in log
    assert not (run_dir / "cli.log").exists()


def test_offline_hub_models_fail_at_once_and_cached_ones_load_without_the_hub(tmp_path, tiny_pipe):
    # No HF_HUB_OFFLINE: a machine whose hub cannot be reached, as on a cluster node.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    args = ["model=sd14", "data.limit=1", "diffusion.num_inference_steps=2", "inversion=ddim"]
    result = subprocess.run([sys.executable, "-m", "nulltext", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "cannot load model 'CompVis/stable-diffusion-v1-4'" in line and "the hub cannot be reached" in line
    assert "Retrying" not in result.stdout + result.stderr, "no retries of a hub that does not answer"

    # The same model in the Hugging Face cache (the layout `hf download` leaves) loads from it.
    snapshot = tmp_path / "hf" / "hub" / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / ("0" * 40)
    tiny_pipe.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    result = subprocess.run([sys.executable, "-m", "nulltext", *args, "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Retrying" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_images"] == 1


def test_data_paths_are_checked_before_the_model(tmp_path):
    result = run_nulltext("model=sd14", "data=coco", "data.dataset.root=/no/coco", cwd=tmp_path)  # sd14 is not cached either
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "COCO root not found: /no/coco" in line, result.stderr[-2000:]


def test_edit_checks_its_image_and_mask_before_the_model(tmp_path):
    result = run_nulltext("edit", "image=no_photo.jpg", "caption=a cat", "prompts=[a dog]", "model=sd14", cwd=tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "image='no_photo.jpg': no such file" in line, result.stderr[-2000:]
