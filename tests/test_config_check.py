"""Config validation (vsalmonn_jax/config_check.py): every rule of the table rejects a bad value with a
message naming the field, the value, the allowed values and the fix; presets pass; commands refuse a
bad config before building anything."""

import math

import pytest

from vsalmonn_jax.cli import main
from vsalmonn_jax.config import load_config
from vsalmonn_jax.config_check import (
    RULES,
    ConfigError,
    LocalPath,
    Number,
    OneOf,
    SubsetOf,
    problems,
    validate,
)


def _bad_values(rule):
    if isinstance(rule, OneOf):
        return ["bogus"]
    if isinstance(rule, LocalPath):
        return ["gs://bucket/runs/sft", 3]
    if isinstance(rule, SubsetOf):
        missing = [tuple(v for v in rule.values if v != need) for need in rule.required]
        return [("bogus",), (*rule.values, "bogus"), *missing]
    bad = ["text", True]
    if math.isfinite(rule.low):
        bad.append(rule.low if rule.open_low else rule.low - 1)
    if math.isfinite(rule.high):
        bad.append(rule.high if rule.open_high else rule.high + 1)
    if rule.integer:
        bad.append(max(rule.low, 1) + 0.5)
    return bad


def _set(config, field, value):
    *parents, leaf = field.split(".")
    node = config
    for name in parents:   # sections tiny lacks (demo.*) are made
        node = node.setdefault(name, {})
    node[leaf] = value


@pytest.mark.parametrize("preset", ["tiny", "tiny_sft", "tiny_dpo", "tiny_mrdpo", "tiny_rebirth",
                                    "7b_sft", "7b_mrdpo", "demo"])
def test_presets_are_valid(preset):
    assert problems(load_config(preset)) == []


@pytest.mark.parametrize("field", sorted(RULES))
def test_each_rule_rejects_bad_values(field):
    rule = RULES[field]
    for value in _bad_values(rule):
        config = load_config("tiny").to_dict()   # a plain dict: any type may be set
        _set(config, field, value)
        found = problems(config)
        assert len(found) == 1, (field, value, found)
        assert found[0].startswith(f"{field}={value!r}: allowed: ")
        assert f"fix: --config.{field}=" in found[0]
        if isinstance(rule, OneOf):
            assert " | ".join(map(str, rule.values)) in found[0]


def test_number_rule_bounds():
    rule = Number(low=0, high=1, open_low=True)
    assert rule.problem(1) is None and rule.problem(0.5) is None
    assert rule.problem(0) and rule.problem(1.01) and rule.problem(float("nan"))
    assert Number(low=1, integer=True, also=(-1,)).problem(-1) is None
    assert Number(low=1, integer=True, also=(-1,)).problem(0)


@pytest.mark.parametrize("override, expect", [
    ("data.missing_audio=ignore", "data.missing_audio='ignore': allowed: silence | error"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: allowed: an integer >= 1"),
    ("data.audio_channel=left", "data.audio_channel='left': allowed: first | mean | dialogue"),
    ("data.fps=0", "data.fps=0.0: allowed: a number > 0"),
    ("train.lr=-1", "train.lr=-1.0: allowed: a number > 0"),
    ("mesh.context=0", "mesh.context=0: allowed: an integer >= 1 (or -1)"),
])
def test_issue_examples_fail(override, expect):
    with pytest.raises(ConfigError, match="invalid config") as err:
        validate(load_config("tiny", [override]))
    assert expect in str(err.value)


def test_empty_tokenizer_fails_when_the_pipeline_needs_one():
    config = load_config("tiny")
    validate(config)  # text-only work needs no tokenizer
    with pytest.raises(ConfigError, match="data.tokenizer is empty.*--config.data.tokenizer=DIR"):
        validate(config, needs_tokenizer=True)
    validate(load_config("tiny", ["data.tokenizer=/some/dir"]), needs_tokenizer=True)


def test_unknown_fields_are_not_errors():
    config = load_config("tiny")
    config.unlock()
    config.model.new_section = {"mode": "whatever"}
    config.data.new_field = "anything"
    del config.mrdpo
    assert problems(config) == []


@pytest.mark.parametrize("argv, expect", [
    (["train", "--config", "tiny_sft", "--config.data.train=synthetic:4",
      "--config.train.checkpoint_every=0"], "train.checkpoint_every=0"),
    (["train", "--config", "tiny_sft", "--config.data.train=/nonexistent.jsonl"], "data.tokenizer is empty"),
    (["eval", "--config", "tiny", "--config.eval.passes=0", "--captions", "x.jsonl", "--gt", "y.jsonl",
      "--out", "r"],
     "eval.passes=0"),
    (["data", "check", "--config", "tiny", "--config.data.missing_audio=ignore", "x.jsonl"],
     "data.missing_audio='ignore'"),
    (["export", "--config", "tiny", "--config.data.fps=0", "--checkpoint", "x", "--out", "y"], "data.fps=0.0"),
    (["plan", "--config", "tiny", "--config.train.lr=-1"], "train.lr=-1.0"),
    (["train", "--config", "tiny_sft", "--config.data.train=synthetic:4", "--workdir",
      "gs://bucket/runs/sft"], "workdir='gs://bucket/runs/sft': allowed: a path on a file system"),
    (["demo", "--quick", "--config.train.log_every=0"], "train.log_every=0"),
    (["caption", "--config", "tiny", "--config.data.audio_channel=left", "--tokenizer", "t",
      "--checkpoint", "x", "v.mp4"], "data.audio_channel='left'"),
])
def test_commands_refuse_bad_config_up_front(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and expect in err
    assert list(tmp_path.iterdir()) == []  # nothing created: no workdir, no config.json


def test_shared_prefix_is_a_boolean():
    config = load_config("tiny").to_dict()
    assert config["dpo"]["shared_prefix"] is True   # prefix-shared DPO is the default
    config["dpo"]["shared_prefix"] = "no"
    (line,) = problems(config)
    assert line.startswith("dpo.shared_prefix='no': allowed: True | False")


def test_remat_names_must_be_tagged_activations():
    assert problems(load_config("tiny", ["model.llm.remat_names=('attention_out',)"])) == []
    (line,) = problems(load_config("tiny", ["model.llm.remat_names=('attention_out', 'q_proj')"]))
    assert "model.llm.remat_names" in line and "attention_out | mlp_in" in line


@pytest.mark.parametrize("override, expect", [
    ("demo.annotator.kind=sloppy", "demo.annotator.kind='sloppy': allowed: realistic | biased"),
    ("demo.annotator.omit.turns=1.5", "demo.annotator.omit.turns=1.5: allowed: a number in [0, 1]"),
    ("demo.annotator.spread=2", "demo.annotator.spread=2.0: allowed: a number in [0, 1]"),
    ("demo.n_val=-1", "demo.n_val=-1: allowed: an integer >= 0"),
    ("demo.gt_caption=biased", "demo.gt_caption='biased': allowed: annotated | exact"),
    ("mrdpo.max_length_gap=-2", "mrdpo.max_length_gap=-2: allowed: an integer >= -1"),
])
def test_demo17_fields_fail(override, expect):
    """The fair-demo fields (issue 17): annotator, validation split, length-controlled pairs."""
    with pytest.raises(ConfigError, match="invalid config") as err:
        validate(load_config("demo", [override]))
    assert expect in str(err.value)


def test_step_counts_are_whole_accumulations(capsys):
    """With grad_accum > 1 the optimizer updates every grad_accum steps: a stage of 10 steps at 4
    applied 2 updates and dropped its last 2 micro-batches' gradients, silently. `train` refuses the
    count of the stage it trains (only that one; caption / export / eval read such configs)."""
    from vsalmonn_jax.config_check import accumulation_problems
    from vsalmonn_jax.training.state import steps_for_epochs

    config = load_config("tiny", ["train.grad_accum=4", "train.num_steps=10",
                                  "mrdpo.steps_per_round=8", "rebirth.num_steps=3"])
    (found,) = accumulation_problems(config)
    assert found.startswith("train.num_steps=10: not a multiple of train.grad_accum=4; its last 2")
    assert found.endswith("--config.train.num_steps=8") and not problems(config)
    config.stage = "mrdpo"
    assert accumulation_problems(config) == []                  # 8 steps per round: whole
    config.stage = "rebirth"
    (found,) = accumulation_problems(config)
    assert found.startswith("rebirth.num_steps=3") and found.endswith("=4")
    config.stage, config.train.epochs = "sft", 1                # epochs: rounded up instead
    assert accumulation_problems(config) == []
    assert steps_for_epochs(config.train, records=36, rows_per_step=8) == 8      # 5 -> 8
    config.train.grad_accum = 1
    assert steps_for_epochs(config.train, records=36, rows_per_step=8) == 5
    argv = ["train", "--config", "tiny_sft", "--config.data.train=synthetic:8",
            "--config.train.grad_accum=4", "--config.train.num_steps=10", "--workdir", "unused"]
    assert main(argv) == 2 and "train.num_steps=10: not a multiple" in capsys.readouterr().err
