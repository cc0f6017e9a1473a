"""Every method with a sampler of its own: ``nulltext reconstruct`` of its artifact equals the in-run reconstruction."""

import pytest

from helpers import FAST, assert_reconstruct_reproduces, composed
from nulltext.cli import run_inversion

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
    assert_reconstruct_reproduces(run_dir, image_id, tmp_path / "rec")
