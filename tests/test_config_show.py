"""`vsalmonn-jax config show` (preset + overrides, as lines or JSON) and the TensorBoard viewer reading
the event files a run writes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from machine import scaled

from vsalmonn_jax.cli import main
from vsalmonn_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_config_show_prints_the_resolved_config():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "config", "show", "--config",
                           "configs/tiny.py", "--config.train.lr=0.25", "--config.data.audio_channel",
                           "dialogue"], capture_output=True, text=True, timeout=scaled(300), env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "train.lr = 0.25" in lines and 'data.audio_channel = "dialogue"' in lines
    expected = load_config("tiny", ["train.lr=0.25", "data.audio_channel=dialogue"])
    assert f"model.llm.hidden_size = {expected.model.llm.hidden_size}" in lines
    assert len(lines) == len(set(lines)) > 100                     # one line per field


def test_config_show_json_and_errors(capsys):
    assert main(["config", "show", "--config", "tiny", "--config.seed=7", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["seed"] == 7 and shown["model"]["llm"] == json.loads(load_config("tiny").model.llm.to_json())
    assert main(["config", "show", "--config.train.no_such=1"]) == 2
    assert "no field 'no_such' in train" in capsys.readouterr().err
    assert main(["config", "show", "--config", "no_such_preset"]) == 2
    assert "config 'no_such_preset' not found" in capsys.readouterr().err


def test_tensorboard_reads_the_event_files_a_run_writes(tmp_path):
    """tensorboardX writes runs/X/tensorboard; the `tensorboard` extra's viewer reads it back."""
    pytest.importorskip("tensorboard", reason="pip install '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vsalmonn_jax.training.loop import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, loss in ((1, 2.5), (2, 1.25)):
        writer.write(step, {"loss": loss})
    writer.write(2, {"loss": 3.0}, split="eval")
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]
