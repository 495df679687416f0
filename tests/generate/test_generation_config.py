"""The checkpoint's generation_config.json: fields the release's HF generate applied and this run does
not are reported (a repetition penalty other than ours even when greedy; other sampling values when
sampling)."""

import json

from vsalmonn_jax.config import load_config
from vsalmonn_jax.generate.generation_config import warn_unapplied
from vsalmonn_jax.generate.sampling import SamplingConfig

QWEN_STYLE = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
              "repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}


def test_unapplied_fields_are_reported_naming_the_file(tmp_path, capsys):
    official = tmp_path / "official"
    official.mkdir()
    (official / "generation_config.json").write_text(json.dumps(QWEN_STYLE))
    config = load_config("tiny", [f"model.pretrained.official={official}"])
    assert warn_unapplied(config, SamplingConfig(greedy=True), "caption") == {"repetition_penalty": 1.05}
    err = capsys.readouterr().err
    assert f"caption: WARNING {official / 'generation_config.json'} sets repetition_penalty=1.05" in err
    sampled = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9)
    # top_p: the release's sampled calls pass 0.9 themselves (the file's never applied)
    assert warn_unapplied(config, sampled, "mrdpo sampling") == {
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20}
    capsys.readouterr()
    # a file without top_k: HF fills in 50 (top_k 0 here would differ from the release's samples);
    # neutral values of the fields we do not implement are not reported, others are
    (official / "generation_config.json").write_text(json.dumps(
        {"temperature": 1.0, "min_new_tokens": 0, "suppress_tokens": [], "typical_p": 1.0}))
    assert warn_unapplied(config, sampled, "caption") == {"top_k": 50}
    assert warn_unapplied(config, SamplingConfig(greedy=False, top_k=50), "caption") == {}
    (official / "generation_config.json").write_text(json.dumps(
        {"suppress_tokens": [7], "min_p": 0.05, "no_repeat_ngram_size": 3}))
    assert warn_unapplied(config, SamplingConfig(greedy=True), "caption") == {
        "suppress_tokens": [7], "min_p": 0.05, "no_repeat_ngram_size": 3}
    (official / "generation_config.json").write_text(json.dumps(QWEN_STYLE))
    capsys.readouterr()
    # the penalty set as the checkpoint's (generate.repetition_penalty / --repetition-penalty): matched
    assert warn_unapplied(config, SamplingConfig(greedy=True, repetition_penalty=1.05), "caption") == {}
    neutral = dict(QWEN_STYLE, repetition_penalty=1.0)
    (official / "generation_config.json").write_text(json.dumps(neutral))
    assert warn_unapplied(config, SamplingConfig(greedy=True), "caption") == {}
    assert warn_unapplied(load_config("tiny"), sampled, "caption") == {}   # no file: nothing to say
    assert capsys.readouterr().err == ""
