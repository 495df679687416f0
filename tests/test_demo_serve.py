"""Captioning new media with a demo run (demo/serve.py): the smallest run with the demo's layout
(data set + cached encoder outputs, stages/init, a finished rebirth stage, config.json) captions a
clip it never saw through `caption --checkpoint RUN` with no other flag and through the Captioner
API, and a training clip's input path (decode, frozen towers, standardisation) equals its cache."""

from __future__ import annotations

import json
import subprocess
import sys

import fake_devices
import jax
import numpy as np
import pytest
from machine import scaled

pytestmark = pytest.mark.slow      # the fixture renders, decodes and encodes 12 clips (~20 s CPU)
TINY = ["--config.demo.n_train=8", "--config.demo.n_val=2", "--config.demo.n_test=2", "--config.demo.n_fresh=2",
        "--config.demo.eval_batch=4", "--config.demo.render_workers=1", "--config.mrdpo.rounds=1",
        "--config.demo.control=False", "--config.generate.max_new_tokens=12"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(run dir, pipeline context, the rebirth model, a clip no split holds)."""
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.data import synthetic
    from vsalmonn_jax.demo import model as model_lib
    from vsalmonn_jax.demo.pipeline import setup
    from vsalmonn_jax.lora import init_lora

    root = tmp_path_factory.mktemp("demo_serve")
    run = root / "demo-20260101-000000"
    config = demo_config(True, None, TINY)
    config.demo.data_dir = str(run / "data")
    ctx, base = setup(config, run, run / "data", lambda message: None)
    (run / "config.json").write_text(config.to_json_best_effort(indent=1))   # as `demo` writes it
    lora = init_lora(jax.random.PRNGKey(1), base["params"]["llm"], ctx.task.model.lora)
    noise = np.random.default_rng(0)   # a trained-looking LoRA (B != 0)
    lora = jax.tree.map(lambda x: np.asarray(x) + 0.05 * noise.standard_normal(x.shape).astype(
        np.float32), jax.device_get(lora))
    model = dict(base, lora={"llm": lora})
    for name in ("sft", "rebirth"):
        model_lib.save_tree(run / "stages" / name / "model.msgpack", model)
        (run / "stages" / name / "done").write_text("")
    unseen = root / "unseen"           # another seed: a clip of no split of the run
    synthetic.render_split(str(unseen), int(config.demo.seed) + 1, "test", 0, 1,
                           synthetic.synthetic_config(config))
    return run, ctx, model, str(unseen / synthetic.clip_path("test", 0))


def test_final_stage_and_stage_folders(demo_run):
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.demo.serve import final_stage

    run, _, _, _ = demo_run
    config = load_config(str(run / "config.json"))
    assert final_stage(run, config, run) == "rebirth"
    assert final_stage(run, config, run / "stages" / "sft") == "sft"
    with pytest.raises(FileNotFoundError, match="stage 'align' has not finished"):
        final_stage(run, config, run / "stages" / "align")
    with pytest.raises(FileNotFoundError, match="no finished mrdpo stage"):
        final_stage(run, config, run / "rounds" / "mrdpo")
    from vsalmonn_jax.demo.report import use_section

    text = "\n".join(use_section(run, config))
    assert "The final model is stage `rebirth`" in text
    assert f"vsalmonn-jax caption VIDEO.mp4 --checkpoint {run} --output captions.jsonl" in text


def test_training_clip_through_the_serve_path_equals_its_cache(demo_run):
    """decode + frozen towers + standardisation of a training clip = the run's cached media, and
    its greedy caption = the demo's own Captioner on that cache."""
    from vsalmonn_jax.demo.caption import Captioner
    from vsalmonn_jax.generate.backend import open_backend
    from vsalmonn_jax.generate.run_dir import resolve_config
    from vsalmonn_jax.generate.sampling import SamplingConfig

    run, ctx, model, _ = demo_run
    config, run_dir, _ = resolve_config(run)
    backend, what = open_backend(config, run_dir, run, sampling=SamplingConfig(), max_new_tokens=12,
                                 batch_size=2, seed=0)
    assert what.endswith("stage rebirth") and backend.stage == "rebirth"
    row = 3
    clip = str(run / "data" / ctx.data["train"]["items"][row]["video"])
    prepared = backend.prepare({"id": clip, "video": clip})
    cached = ctx.data["train"]["media"]
    for key in ("vision", "audio"):
        np.testing.assert_allclose(prepared["media"][key][0].astype(np.float32),
                                   cached[key][row].astype(np.float32), atol=2e-2, rtol=1e-2)
    for key in ("frame_mask", "frame_times", "audio_seconds"):
        np.testing.assert_array_equal(prepared["media"][key][0], cached[key][row])
    (got,) = backend.caption([({"id": clip}, 0, prepared)])
    (want, stopped) = Captioner(ctx.task, ctx.tokens, model).captions(
        ctx.data["train"], batch=2, max_new_tokens=12, rows=np.asarray([row]))[0]
    assert got["caption"] == want and got["stopped"] == stopped and got["num_tokens"] >= 1
    assert np.isfinite(got["logprob"]) and got["logprob"] <= 0.0


def test_caption_cli_and_api_on_a_clip_the_run_never_saw(demo_run, tmp_path):
    from vsalmonn_jax import Captioner

    run, _, _, unseen = demo_run
    env = fake_devices.env(1)   # one CPU device, as users run it
    out = tmp_path / "captions.jsonl"
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "caption", unseen,
                           "--checkpoint", str(run), "--output", str(out), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=scaled(900))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"demo run {run}, stage rebirth" in done.stderr
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["video"] == unseen and line["caption"] and 1 <= line["num_tokens"] <= 12
    captioner = Captioner.from_pretrained(run)
    assert captioner.caption(unseen) == line["caption"]
    train_clip = str(run / "data" / "media" / "train" / "train_000000.mp4")
    both = captioner.caption([unseen, train_clip])
    assert both[0] == line["caption"] and isinstance(both[1], str)


def test_export_of_a_demo_run_loads_in_transformers(demo_run, tmp_path):
    from export_check import assert_export_matches

    from vsalmonn_jax.cli import main as cli
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.safetensors_io import SafetensorsReader

    run, _, model, _ = demo_run
    out = tmp_path / "export"
    assert cli(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    config = load_config(str(run / "config.json"))
    assert_export_matches(out, config, model["params"]["llm"], model["lora"]["llm"])
    assert (out / "tokenizer.json").is_file()
    encoders = SafetensorsReader(out / "av" / "encoders.safetensors").keys()
    assert {k.split(".")[0] for k in encoders} == {"audio", "vision"}
    assert any(k.startswith("vision_connector.") for k in
               SafetensorsReader(out / "av" / "connectors.safetensors").keys())
