"""Shared fixtures: the tiny random-init pipeline (built from conf/model/tiny.yaml) and real photos."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """No test touches the network or the user's caches."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when it was imported (before this fixture): set its switch too,
    # or an in-process hub lookup tries the network (and waits for its time-outs) before failing.
    mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("NULLTEXT_CACHE", str(tmp_path_factory.mktemp("nulltext-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_pipe():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return instantiate(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml"))


@pytest.fixture(scope="session")
def sample_images():
    """The offline sample photos at 64 px, uint8 [N,3,64,64]."""
    from nulltext.data import SampleImages

    dataset = SampleImages(resolution=64)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models' calls are too small to share between threads: one is faster and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
