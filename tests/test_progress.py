"""The run's progress bar: per image, only on a terminal, and never after the summary table."""

import re

import pytest
from hydra.utils import instantiate

from helpers import FAST, composed, run_nulltext
from nulltext.cli import TABLE_COLUMNS
from nulltext.runner import ImageProgressBar, progress_bar_settings


@pytest.mark.parametrize(
    "setting, interactive, shown",
    [(None, True, True), (None, False, False), (True, False, True), (False, True, False)],
)
def test_the_bar_shows_on_a_terminal_unless_forced(setting, interactive, shown):
    settings = progress_bar_settings(setting, interactive)
    assert settings["enable_progress_bar"] is shown
    assert [type(c) for c in settings["callbacks"]] == ([ImageProgressBar] if shown else [])


@pytest.mark.parametrize("interactive", [True, False])
def test_composed_trainer_has_the_image_bar_only_on_a_terminal(tmp_path, interactive):
    with composed("config", FAST, tmp_path) as cfg:
        assert cfg.trainer.enable_progress_bar is None  # the default: decided by the terminal
        progress = progress_bar_settings(cfg.trainer.enable_progress_bar, interactive)
        trainer = instantiate(cfg.trainer, logger=False, **progress)
    bar = trainer.progress_bar_callback
    if interactive:
        assert isinstance(bar, ImageProgressBar) and bar.is_enabled
    else:
        assert bar is None
        assert not any(isinstance(c, ImageProgressBar) for c in trainer.callbacks)


def _table_at_the_end(stdout: str, method: str, images: int) -> None:
    lines = stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("outputs: ")
    header, rule, row = lines[-4:-1]
    assert header.split() == " ".join(TABLE_COLUMNS).split()
    assert set(rule.replace(" ", "")) == {"-"}
    assert row.split()[0] == method and row.split()[-1] == str(images)


@pytest.mark.slow
def test_a_run_counts_images_and_its_table_stays_last(tmp_path):
    # Forced on (the test's stderr is not a terminal): 3 images in batches of 2 plus 1.
    result = run_nulltext(
        *FAST, "inversion=ddim", "data.limit=3", "data.batch_size=2", "trainer.enable_progress_bar=true",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _table_at_the_end(result.stdout, "ddim", 3)
    assert "Inverting" not in result.stdout  # the bar writes to stderr only
    frames = re.split(r"[\r\n]", result.stderr)
    counts = [re.search(r"Inverting.*\| (\d+)/(\d+) \[(\S+)<(\S+),", f) for f in frames]
    counts = [(int(m[1]), int(m[2])) for m in counts if m]
    assert counts and all(total == 3 for _, total in counts)
    assert [n for n, _ in counts][-1] == 3 and {2, 3} <= {n for n, _ in counts}  # a batch of 2, then 1 more
    assert "image " in result.stderr  # the postfix names the last image

    plain = run_nulltext(*FAST, "inversion=ddim", "data.limit=1", f"hydra.run.dir={tmp_path / 'plain'}", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "Inverting" not in plain.stderr  # not a terminal: no bar by default
    _table_at_the_end(plain.stdout, "ddim", 1)
