"""The 7B presets feed the released weights the release's input format; the tiny presets keep the
clean forms (parity tests). Checked on what the code reads from each preset, not only the fields."""

import pathlib

import pytest

from vsalmonn_jax.config import CONFIG_DIR, load_config
from vsalmonn_jax.data.example import FeatureSettings, Featurizer
from vsalmonn_jax.models.av_llm import AVConfig
from vsalmonn_jax.training.steps import StepOptions

PRESETS_7B = sorted(p.stem for p in pathlib.Path(CONFIG_DIR).glob("7b*.py"))
PRESETS_TINY = sorted(p.stem for p in pathlib.Path(CONFIG_DIR).glob("tiny*.py"))


def _format_of(config) -> dict:
    av = AVConfig.from_config(config, placeholder_id=0)
    settings = FeatureSettings.from_config(config)
    featurizer = Featurizer.from_config(config, tokenizer_path="unused")
    return {"interleave": av.interleave, "prompt_format": featurizer.prompt_format,
            "time_tokens": featurizer.time_tokens, "qformer_dropout": av.qformer.dropout,
            "audio_cut": settings.audio_cut, "frame_sampling": settings.frame_sampling,
            "max_frames": settings.max_frames, "video_audio": settings.video_audio}


def _format(name: str) -> dict:
    return _format_of(load_config(name))


@pytest.mark.parametrize("name", PRESETS_7B)
def test_7b_presets_default_to_the_release_input_format(name):
    assert _format(name) == {"interleave": "official", "prompt_format": "official",
                             "time_tokens": "official", "qformer_dropout": 0.1,
                             "audio_cut": "video", "frame_sampling": "file", "max_frames": 110,
                             "video_audio": "record"}
    assert StepOptions.from_config(load_config(name)).dropout      # training draws dropout rngs


@pytest.mark.parametrize("name", PRESETS_TINY)
def test_tiny_presets_keep_the_clean_forms(name):
    assert _format(name) == {"interleave": "timestamp", "prompt_format": "clean",
                             "time_tokens": "none", "qformer_dropout": 0.0,
                             "audio_cut": "none", "frame_sampling": "grid", "max_frames": 110,
                             "video_audio": "track"}


def test_each_official_form_has_its_clean_flag():
    clean = ["model.connector.interleave=timestamp", "data.prompt_format=clean",
             "data.time_tokens=none", "model.qformer.dropout=0.0", "data.audio_cut=none",
             "data.video_audio=track",
             "data.frame_sampling=grid"]
    config = load_config("7b", clean)
    assert _format_of(config) == _format("tiny")
    assert StepOptions.from_config(config).dropout     # LoRA dropout 0.05 still draws rngs
    assert not StepOptions.from_config(load_config("tiny")).dropout



def test_the_7b_mrdpo_preset_samples_as_the_release():
    """The release's DPO sampling passes do_sample and top_p 0.9 to HF generate under transformers
    4.39.2, whose defaults add temperature 1.0 and top_k 50 (the preset had top_k 0: no cut)."""
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.training.mrdpo import MrdpoOptions

    sampling = MrdpoOptions.from_config(load_config("7b_mrdpo")).sampling
    assert (sampling.greedy, sampling.temperature, sampling.top_k, sampling.top_p) == (False, 1.0, 50, 0.9)
