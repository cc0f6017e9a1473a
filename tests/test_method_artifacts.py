"""Every method with a sampler of its own: ``nulltext reconstruct`` of its artifact equals the in-run reconstruction."""

import numpy as np
import pytest
from PIL import Image

from helpers import FAST, composed
from nulltext.cli import run_inversion, run_reconstruction

# Few iterations: the point is the round trip, not the quality.
METHOD_SETTINGS = {
    "fixed_point": ["inversion.num_iterations=2"],
    "renoise": ["inversion.noise_regularization=true", "inversion.num_reg_steps=1"],
    "edict": [],
    "bdia": [],
    "direct_inversion": [],
    "proximal_negative_prompt": ["inversion.recon_t=600"],
}


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_reconstruction_from_the_artifact_is_bit_identical(method, tmp_path):
    run_dir = tmp_path / "run"
    with composed("config", [*FAST, f"inversion={method}", "data.limit=1", *METHOD_SETTINGS[method]], run_dir) as cfg:
        metrics = run_inversion(cfg)
    image_id = metrics["images"][0]["id"]
    in_run = np.asarray(Image.open(run_dir / "images" / f"{image_id}.png"))
    width = in_run.shape[1] // 3
    with composed("reconstruct", [f"artifact={run_dir / 'inversions' / (image_id + '.safetensors')}"], tmp_path / "rec") as cfg:
        rebuilt = np.asarray(Image.open(run_reconstruction(cfg)))
    np.testing.assert_array_equal(rebuilt, in_run[:, 2 * width :])
    # Not the input, and not the VAE image either, unless the method reconstructs exactly.
    assert np.abs(rebuilt.astype(int) - in_run[:, :width].astype(int)).mean() > 1
