"""Runs that describe themselves: after a tiny AV LoRA SFT run (train CLI), `caption --checkpoint RUN`
needs no other flag (its config.json and tokenizer copy), `--config RUN/config.json` gives the same,
a wrong preset names the mismatched shapes, `export` writes a directory transformers loads directly
(logits equal to our LoRA model's), and the Captioner API captions as the CLI does."""

from __future__ import annotations

import json
import subprocess
import sys

import fake_devices
import numpy as np
import pytest
from export_check import assert_export_matches
from machine import scaled

from vsalmonn_jax.cli import main as cli

# trains a run through the CLI, captions in a subprocess; one worker builds the module's run once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("runs")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run workdir, two test clips it never trained on)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "data"
    assert cli(["data", "synth", "--out", str(data), "--n", "4", "--n-val", "0", "--n-test", "2"]) == 0
    workdir = root / "run"
    assert cli(["train", "--config", "tiny", "--config.stage=sft", "--config.mesh.data=-1",
                f"--config.data.train={data}/sft_train.jsonl", f"--config.data.root={data}",
                f"--config.data.tokenizer={data}/tokenizer", "--config.train.num_steps=2",
                "--config.train.checkpoint_every=2", "--config.train.lr=0.01",
                "--workdir", str(workdir), "--no-progress"]) == 0
    clips = sorted(str(p) for p in (data / "media" / "test").glob("*.mp4"))
    return workdir, clips


def test_the_run_keeps_its_config_and_tokenizer(run):
    from vsalmonn_jax.generate.run_dir import find_run_dir, resolve_config

    workdir, _ = run
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    assert find_run_dir(workdir / "checkpoints" / "2" / "state") == workdir
    config, run_dir, source = resolve_config(workdir / "checkpoints")
    assert run_dir == workdir and source == str(workdir / "config.json")
    assert config.data.tokenizer == str(workdir / "tokenizer") and config.model.llm.hidden_size == 64
    assert config.data.length_buckets == tuple(config.data.length_buckets)   # types survive JSON
    config, _, _ = resolve_config(workdir, overrides=["--config.data.tokenizer=/elsewhere"])
    assert config.data.tokenizer == "/elsewhere"                             # overrides win


def test_caption_cli_needs_no_other_flag(run, tmp_path, capsys):
    workdir, clips = run
    env = fake_devices.env(1)   # one CPU device
    out = tmp_path / "captions.jsonl"
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "caption", *clips, "--checkpoint",
                           str(workdir), "--output", str(out), "--max-new-tokens", "6", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=scaled(900))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"config {workdir / 'config.json'}" in done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["video"] for x in lines] == clips and all(1 <= x["num_tokens"] <= 6 for x in lines)
    assert lines[0]["logprob"] != lines[1]["logprob"]          # the caption depends on the clip

    # the Captioner API: one call, the CLI's captions; config= a run's config.json (= --config
    # RUN/config.json) reads as the run's own
    from vsalmonn_jax import Captioner

    captioner = Captioner.from_pretrained(workdir / "checkpoints", config=str(workdir / "config.json"),
                                          max_new_tokens=6)
    assert captioner.caption(clips) == [x["caption"] for x in lines]
    assert captioner.caption(clips[1]) == lines[1]["caption"]
    sampled = captioner.caption(clips, temperature=1.0, top_p=0.9, sample=3)
    assert len(sampled) == 2 and all(isinstance(c, str) for c in sampled)
    with pytest.raises(ValueError, match="nope.mp4: not a video or audio file"):
        captioner.caption(str(tmp_path / "nope.mp4"))
    with pytest.raises(TypeError, match="unknown sampling argument"):
        captioner.caption(clips[0], temprature=0.5)


def test_wrong_preset_names_the_mismatched_shapes(run, tmp_path, capsys):
    workdir, clips = run
    code = cli(["caption", clips[0], "--checkpoint", str(workdir), "--config", "demo",
                "--output", str(tmp_path / "x.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the config's shapes" in err
    assert "trainable/adapter/audio_connector/audio_proj/kernel: checkpoint (32, 64), config (64, 96)" in err
    assert "drop --config to use the run's own config.json" in err
    assert cli(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "e"), "--config",
                "demo"]) == 1
    assert "lora/layers/self_attn/q_proj/a: checkpoint (2, 64, 8), config (2, 96, 16)" in \
        capsys.readouterr().err
    assert cli(["caption", clips[0], "--checkpoint", str(tmp_path)]) == 2
    assert "no run config.json" in capsys.readouterr().err


def test_export_of_a_lora_sft_run_loads_in_transformers(run, tmp_path):
    import jax

    from vsalmonn_jax.generate.model_load import restore_for_inference
    from vsalmonn_jax.generate.run_dir import resolve_config
    from vsalmonn_jax.safetensors_io import SafetensorsReader
    from vsalmonn_jax.training.av_task import build
    from vsalmonn_jax.training.sharding import make_mesh

    workdir, _ = run
    out = tmp_path / "export"
    assert cli(["export", "--checkpoint", str(workdir), "--out", str(out)]) == 0
    config, _, _ = resolve_config(workdir)
    variables, _ = restore_for_inference(config, build(config), make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                         workdir)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    assert_export_matches(out, config, variables["params"]["llm"], variables["lora"]["llm"])
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["lora_merged"] and manifest["base"] == "init" and manifest["step"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "av" / "config.json").is_file()
    connectors = SafetensorsReader(out / "av" / "connectors.safetensors")
    from flax import traverse_util

    adapter = traverse_util.flatten_dict(variables["adapter"], sep=".")
    assert sorted(connectors.keys()) == sorted(adapter)
    for name, value in adapter.items():
        np.testing.assert_array_equal(connectors[name], value)
    encoders = SafetensorsReader(out / "av" / "encoders.safetensors").keys()
    assert {k.split(".")[0] for k in encoders} == {"audio", "vision"}
