"""mrDPO on the audio-visual model over real synthetic .mp4 clips (AVPolicyEnv): a round samples,
pairs, trains from DPO loss log 2 and merges; the final round state exports with its connectors."""

import json

import jax
import numpy as np
import pytest
from mrdpo_helpers import LengthJudge

from vsalmonn_jax.config import load_config
from vsalmonn_jax.data.records import load_records
from vsalmonn_jax.data.synthetic import build_dataset
from vsalmonn_jax.data.synthetic_scene import default_config
from vsalmonn_jax.data.text import load_tokenizer
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.av_task import build
from vsalmonn_jax.training.mrdpo import run_mrdpo
from vsalmonn_jax.training.policy_env import AVPolicyEnv
from vsalmonn_jax.training.sharding import make_mesh

pytestmark = pytest.mark.slow


def test_av_round_trains_merges_and_exports(tmp_path):
    scene = default_config()
    scene.update(dict(min_seconds=2, max_seconds=3))
    build_dataset(str(tmp_path / "data"), n_train=4, n_val=0, n_test=2, cfg=scene)
    config = load_config("tiny", [
        f"data.tokenizer={tmp_path / 'data' / 'tokenizer'}", "data.max_frames=4", "stage=mrdpo",
        "mesh.data=2", "train.warmup_ratio=0.0", "train.lr=0.003", "train.checkpoint_every=2",
        "mrdpo.rounds=1", "mrdpo.steps_per_round=2", "mrdpo.max_new_tokens=6",
        "mrdpo.batch_size=2", "generate.max_new_tokens=6"])
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    task = build(config)
    tx, _ = st.make_optimizer(config.train, 1)
    state, _ = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
    adapter0 = jax.tree.map(np.asarray, jax.device_get(state.trainable["adapter"]))
    env = AVPolicyEnv(config, task, load_tokenizer(config.data.tokenizer), mesh=mesh, sample_batch=4)
    train = load_records(str(tmp_path / "data" / "train.jsonl"), kind="caption")
    test = load_records(str(tmp_path / "data" / "test.jsonl"), kind="caption")
    state, summary = run_mrdpo(config, env, tmp_path / "mrdpo", state=state, train_items=train,
                               eval_items=test, mesh=mesh, judge=LengthJudge())
    (round0,) = summary["history"]
    assert round0["first_step"]["dpo_loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    assert round0["pairs"]["samples"] == 8 and round0["pairs"]["pairs"] >= 1
    assert len(round0["eval"]["captions"]) == 2
    pairs = [json.loads(line) for line in open(tmp_path / "mrdpo" / "round_0" / "pairs.jsonl")]
    assert all(p["video"].endswith(".mp4") and "gt" in p for p in pairs)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         jax.device_get(state.trainable["adapter"]), adapter0)
    assert max(jax.tree.leaves(moved)) > 0          # the connectors trained too
    assert len(env.prepared) == 6                   # each clip decoded once (4 train + 2 test)

    from vsalmonn_jax.cli import main as cli

    out = tmp_path / "export"
    assert cli(["export", "--checkpoint", str(tmp_path / "mrdpo"), "--out", str(out), "--config",
                "tiny", f"--config.data.tokenizer={config.data.tokenizer}"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["step"] == 1 and manifest["base"] == "checkpoint"
    assert set(manifest["encoders"]) == {"audio", "vision"}
    assert any(k.startswith("audio_connector.") for k in manifest["connectors"])
    assert (out / "llm" / "tokenizer.json").is_file()
