"""A run's config.json (training/run_config.py): written once, never overwritten with another config;
a resume that changes a weight-affecting field is refused unless allowed, then recorded."""

import json
import os
import subprocess
import sys

import pytest
from machine import scaled

from vsalmonn_jax.config import load_config
from vsalmonn_jax.training.run_config import (
    RECORDS_KEY,
    ConfigChangedError,
    add_record,
    as_dict,
    config_changes,
    is_free,
    write_run_config,
)


def test_first_start_writes_and_same_config_resumes(tmp_path):
    config = load_config("tiny_sft")
    assert write_run_config(tmp_path, config) == {}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["lr"] == config.train.lr and RECORDS_KEY not in saved
    assert write_run_config(tmp_path, load_config("tiny_sft")) == {}


@pytest.mark.parametrize("override", ["train.lr=0.5", "model.lora.alpha=4.0",
                                      "data.train=other.jsonl", "dpo.beta=0.5", "mrdpo.rounds=7",
                                      "seed=1", "data.max_frames=3"])
def test_weight_affecting_change_is_refused_and_config_kept(tmp_path, override):
    write_run_config(tmp_path, load_config("tiny_sft"))
    before = (tmp_path / "config.json").read_text()
    field = override.split("=")[0]
    with pytest.raises(ConfigChangedError, match=rf"(?s){field}: .* -> .*--allow-config-change"):
        write_run_config(tmp_path, load_config("tiny_sft", [override]))
    assert (tmp_path / "config.json").read_text() == before


@pytest.mark.parametrize("override", ["train.log_every=7", "train.checkpoint_every=3",
                                      "train.keep_checkpoints=9", "workdir=elsewhere",
                                      "mesh.data=2", "generate.top_k=50"])
def test_cadence_and_placement_changes_resume(tmp_path, override):
    write_run_config(tmp_path, load_config("tiny_sft"))
    before = (tmp_path / "config.json").read_text()
    field = override.split("=")[0]
    assert is_free(field)
    changes = write_run_config(tmp_path, load_config("tiny_sft", [override]))
    assert list(changes) == [field]
    assert (tmp_path / "config.json").read_text() == before


def test_allowed_change_is_recorded_with_both_configs(tmp_path):
    write_run_config(tmp_path, load_config("tiny_sft"))
    new = load_config("tiny_sft", ["train.lr=0.5", "train.log_every=3"])
    write_run_config(tmp_path, new, allow_change=True)
    write_run_config(tmp_path, load_config("tiny_sft", ["train.lr=0.25"]), allow_change=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["lr"] == load_config("tiny_sft").train.lr   # the original stays
    records = saved[RECORDS_KEY]["config_changes"]
    assert records[0] == {"resume": 1, "config": "config.resume-1.json",
                          "changes": {"train.lr": [0.001, 0.5]}}
    assert records[1]["changes"] == {"train.lr": [0.001, 0.25]}
    assert json.loads((tmp_path / "config.resume-1.json").read_text())["train"]["lr"] == 0.5


def test_records_and_new_fields_are_not_changes(tmp_path):
    write_run_config(tmp_path, load_config("tiny_sft"))
    add_record(tmp_path, "loaded", {"llm": "Qwen/Qwen2-7B", "sha": "abc"})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[RECORDS_KEY]["loaded"]["sha"] == "abc"
    newer = load_config("tiny_sft")
    newer.model.pretrained = {"llm": "x"}   # a field a newer version of the code added
    assert config_changes(saved, json.loads(newer.to_json())) == {}
    assert write_run_config(tmp_path, newer) == {}


def test_unreadable_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"stage": "sf')
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: not valid JSON"):
        write_run_config(tmp_path, load_config("tiny_sft"))


def test_a_hand_edited_utf8_config_reads_back_under_an_ascii_locale(tmp_path):
    """Our JSON readers decode UTF-8 whatever the locale: a run's config.json with a non-ASCII path
    (written by hand or another tool) reads back in a process whose default encoding is ASCII."""
    write_run_config(tmp_path, load_config("tiny_sft"))
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    saved["data"]["train"] = "/données/train.jsonl"
    (tmp_path / "config.json").write_text(json.dumps(saved, ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", LANG="C")
    code = ("import locale, sys; from vsalmonn_jax.training.run_config import read_run_config; "
            "assert locale.getpreferredencoding(False) != 'UTF-8', locale.getpreferredencoding(False); "
            f"print(ascii(read_run_config({str(tmp_path)!r})['data']['train']))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=scaled(300))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ascii("/données/train.jsonl")


def test_a_new_field_with_a_new_preset_default_is_a_change(tmp_path):
    """data.video_audio came after runs saved without it (they decoded the file's track); the 7B
    preset now says record: resuming such a run took the new rule unnoticed. A missing field is
    compared with the value the run had (LEGACY_VALUES)."""
    old = as_dict(load_config("7b"))
    del old["data"]["video_audio"]
    assert config_changes(old, as_dict(load_config("7b"))) == {"data.video_audio": ("track", "record")}
    assert config_changes(old, as_dict(load_config("7b", ["data.video_audio=track"]))) == {}
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigChangedError, match="data.video_audio: 'track' -> 'record'"):
        write_run_config(tmp_path, load_config("7b"))


def test_runs_saved_before_frozen_and_ce_mean_resume_with_their_values_only(tmp_path):
    """train.frozen / train.ce_mean came later (the runs before trained audio_proj and pooled the
    CE over tokens): a missing field compares as that value, a tuple () equal to the saved []."""
    old = as_dict(load_config("tiny_sft"))
    del old["train"]["frozen"], old["train"]["ce_mean"]
    assert config_changes(old, as_dict(load_config("tiny_sft"))) == {}
    old7 = as_dict(load_config("7b_sft"))
    del old7["train"]["frozen"], old7["train"]["ce_mean"]
    assert config_changes(old7, as_dict(load_config("7b_sft"))) == {
        "train.ce_mean": ("tokens", "rows"),
        "train.frozen": ([], ["adapter/audio_connector/audio_proj"])}
