"""The AV model through the training steps: media encoded once, DPO at init = log 2, only the
adapter / LoRA move, frozen encoders and LLM bit-identical.
"""

import math

import jax
import numpy as np
import pytest
from toy_tasks import build, device_batch, host, mesh_of, tiny_config

from vsalmonn_jax.models import av_llm
from vsalmonn_jax.training.task import build_task

PH = 500


def _av_dpo_batch(task, n=4):
    base = av_llm.dummy_batch(task.av_config, batch=n, frames=2, chunks=1, text_len=12)
    rng = np.random.default_rng(0)
    out = {k: v for k, v in base.items() if k not in ("input_ids", "attention_mask", "loss_mask")}
    out["pixel_values"] = rng.normal(size=out["pixel_values"].shape).astype(np.float32)
    out["mel"] = rng.normal(size=out["mel"].shape).astype(np.float32)
    prompt = rng.integers(3, 400, size=(n, 6)).astype(np.int32)  # shared by the pair's answers
    prompt[:, 1] = PH
    for prefix in ("chosen_", "rejected_", "gt_"):
        ids = rng.integers(3, 400, size=(n, 12)).astype(np.int32)
        ids[:, :6] = prompt
        loss = np.zeros((n, 12), bool)
        loss[:, 6:] = True
        out.update({prefix + "input_ids": ids, prefix + "attention_mask": np.ones((n, 12), bool),
                    prefix + "loss_mask": loss})
    out["example_id"] = np.arange(n)
    return out


@pytest.mark.slow
def test_av_dpo_steps():
    config = tiny_config("stage=dpo", "train.warmup_ratio=0.0", "train.lr=1e-2")
    task = build_task(config, placeholder_id=PH)
    assert type(task).__name__ == "AVTask"
    _, state, steps = build(config, mesh_of(4), task=task)
    assert set(state.trainable) == {"lora", "adapter"} and state.trainable["adapter"]
    params0, adapter0 = host(state.params), host(state.trainable["adapter"])
    batch = device_batch(_av_dpo_batch(task), steps)
    history = []
    for _ in range(4):
        state, metrics = steps.train(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert history[-1]["dpo_loss"] < history[0]["dpo_loss"]
    assert all(h["finite"] == 1.0 for h in history)
    for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params0), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(host(state.trainable["adapter"])), jax.tree.leaves(adapter0),
                   strict=True)]
    assert any(changed)
