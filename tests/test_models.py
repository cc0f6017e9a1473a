"""Model loading: the real from_pretrained path on a local folder, offline; the CLIP tokenizer."""

import pytest
import torch

from nulltext.errors import ModelUnavailableError, UnknownNameError
from nulltext.models import SD_SCHEDULER_CONFIG, clip_tokenizer, load_pipeline, pipeline_resolution


def test_clip_tokenizer_gives_the_sd_v1_ids():
    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    padded = tokenizer("", padding="max_length", max_length=77).input_ids
    assert padded == [49406] + [49407] * 76  # SD v1 pads with <|endoftext|>


def test_a_saved_pipeline_loads_offline_frozen_and_identical(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"), local_files_only=True)
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    assert pipeline_resolution(loaded) == pipeline_resolution(tiny_pipe) == 64
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert loaded.scheduler.config[key] == SD_SCHEDULER_CONFIG[key]
    z, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.unet(z, 501, encoder_hidden_states=context).sample,
            tiny_pipe.unet(z, 501, encoder_hidden_states=context).sample,
            atol=0,
            rtol=0,
        )
    assert loaded.tokenizer("a cat").input_ids == tiny_pipe.tokenizer("a cat").input_ids


def test_missing_weights_and_unknown_names_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match=r"give a local pipeline folder instead \(model.path=") as error:
        load_pipeline("CompVis/stable-diffusion-v1-4")
    assert "\n" not in str(error.value)
    with pytest.raises(UnknownNameError, match="unknown model 'sd99'"):
        load_pipeline("sd99")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
