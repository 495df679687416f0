"""train.feature_cache: frozen-encoder outputs cached per example on disk give the same training
as encoding every step, later epochs / runs never re-encode, and a weight change misses the cache."""

import numpy as np
import pytest
from toy_tasks import MEDIA_DIM, MediaTask, mesh_of, tiny_config

from vsalmonn_jax.training import synthetic
from vsalmonn_jax.training.loop import run_stage
from vsalmonn_jax.training.task import build_task


def _data():
    data = synthetic.dpo_examples(8, 512, 12, seed=4)
    data["media"] = np.random.default_rng(2).normal(size=(8, MEDIA_DIM)).astype(np.float32)
    return data


def _run(workdir, cache_dir, task):
    overrides = ["stage=dpo", "train.num_steps=4", "train.checkpoint_every=100"]
    if cache_dir:
        overrides.append(f"train.feature_cache={cache_dir}")
    config = tiny_config(*overrides)
    losses = []
    it = synthetic.ArrayIterator(_data(), 4, seed=0)
    _, summary = run_stage(config, it, workdir, task=task, mesh=mesh_of(4), progress=False,
                           tensorboard=False, on_step=lambda s, m: losses.append(m["loss"]))
    return losses, summary


@pytest.mark.slow
def test_feature_cache_matches_and_skips_encoders(tmp_path):
    base = build_task(tiny_config(), text_only=True)
    task = MediaTask(base.llm_config, base.lora_config)
    plain, _ = _run(tmp_path / "plain", "", task)
    cached, summary = _run(tmp_path / "cached", tmp_path / "features", task)
    np.testing.assert_allclose(cached, plain, rtol=1e-6)
    assert summary["feature_cache"] == {"hits": 8, "misses": 8}  # epoch 2 reads the cache
    again, summary = _run(tmp_path / "again", tmp_path / "features", task)
    assert summary["feature_cache"] == {"hits": 16, "misses": 0}
    np.testing.assert_allclose(again, plain, rtol=1e-6)
    files = list((tmp_path / "features").rglob("*.npz"))
    assert len(files) == 8 and set(np.load(files[0]).files) == {"features"}
