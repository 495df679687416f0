"""A run's saved config.json as a config (`--config RUN/config.json`, `caption/export --checkpoint RUN`):
every preset survives the JSON round trip with its field types, a transformers config.json is refused
clearly, the run folder is found from its checkpoints, and the tokenizer copy travels with the run."""

from __future__ import annotations

import json
import pathlib

import pytest

from vsalmonn_jax.config import CONFIG_DIR, load_config


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIG_DIR.glob("*.py")))
def test_every_preset_round_trips_through_config_json(preset, tmp_path):
    config = load_config(preset, ["--config.train.lr=0.5"])
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort(indent=2))
    again = load_config(str(path), ["--config.seed=7"])
    assert again.seed == 7 and again.train.lr == 0.5
    again.seed = config.seed
    assert again.to_dict() == config.to_dict()          # tuples stay tuples, extra sections kept


def test_a_transformers_config_json_is_not_a_run_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a run's config.json"):
        load_config(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        load_config(str(path))


def test_run_dir_found_from_its_checkpoints_and_tokenizer_copied(tmp_path):
    from vsalmonn_jax.generate.run_dir import find_run_dir, resolve_config, save_tokenizer

    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    config = load_config("tiny", [f"--config.data.tokenizer={tokenizer}"])
    (run / "config.json").write_text(config.to_json_best_effort())
    assert save_tokenizer(config, run) == str(run / "tokenizer")
    assert (run / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert find_run_dir(run / "checkpoints" / "4" / "state") == run
    assert find_run_dir(tmp_path) is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert find_run_dir(tmp_path / "hf") is None          # an export's LLM config is not a run
    loaded, found, source = resolve_config(run / "checkpoints")
    assert found == run and source == str(run / "config.json")
    assert loaded.data.tokenizer == str(run / "tokenizer")   # the run's copy wins
    preset, _, _ = resolve_config(run, "demo")                # an explicit config wins
    assert preset.model.llm.hidden_size == 96 and preset.data.tokenizer == str(run / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no run config.json"):
        resolve_config(tmp_path / "hf")


def test_only_tokenizer_files_travel_from_a_weights_folder(tmp_path):
    """data.tokenizer found in the LLaVA / official weights folder (resolve_tokenizer): the run's
    copy took the whole folder (15+ GB at 7B), and export copied its model.safetensors over the
    merged model it had just written (transformers then loaded the pre-training LLM)."""
    from vsalmonn_jax.generate.run_dir import save_tokenizer, tokenizer_files

    weights = tmp_path / "llava"
    weights.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "vocab.json",
                 "model.safetensors", "model-00001-of-00002.safetensors", "config.json",
                 "generation_config.json"):
        (weights / name).write_text(name)
    assert sorted(p.name for p in tokenizer_files(weights)) == [
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    config = load_config("tiny", [f"--config.data.tokenizer={weights}"])
    copy = save_tokenizer(config, tmp_path / "run")
    assert sorted(p.name for p in pathlib.Path(copy).iterdir()) == [
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_a_runs_records_are_not_read_back_as_settings(tmp_path):
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.training.run_config import add_record, write_run_config

    write_run_config(tmp_path, load_config("tiny"), allow_change=False)
    add_record(tmp_path, "pretrained", {"base": "pretrained"})
    config = load_config(str(tmp_path / "config.json"))
    assert "run_records" not in config and config.model.llm.hidden_size == 64


def test_checkpoint_root_of_each_run_kind(tmp_path):
    from vsalmonn_jax.generate.model_load import checkpoint_root, latest_step

    (tmp_path / "sft" / "checkpoints" / "4" / "state").mkdir(parents=True)
    (tmp_path / "mrdpo" / "rounds" / "2" / "state").mkdir(parents=True)
    (tmp_path / "mrdpo" / "round_1" / "checkpoints" / "9" / "state").mkdir(parents=True)
    assert checkpoint_root(tmp_path / "sft") == tmp_path / "sft" / "checkpoints"
    assert checkpoint_root(tmp_path / "mrdpo") == tmp_path / "mrdpo" / "rounds"   # the final round
    assert latest_step(checkpoint_root(tmp_path / "mrdpo")) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_root(tmp_path / "nope")
