"""The mrDPO round boundary: merge LoRA into the base + fresh LoRA leaves the policy's logits unchanged
(fp32, 1e-5), and the next round's first DPO step sees reference == policy (loss log 2, margin 0)."""

import math

import jax
import numpy as np
import pytest
from toy_tasks import MEDIA_DIM, MediaTask, device_batch, host, mesh_of, tiny_config

from vsalmonn_jax.lora import LoraConfig, merge
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training import steps as sp
from vsalmonn_jax.training.loop import prepare_state
from vsalmonn_jax.training.mrdpo import merge_round
from vsalmonn_jax.training.synthetic import dpo_examples
from vsalmonn_jax.training.task import build_task, present


def _trained_like(state, seed=1):
    """Pretend a round happened: random non-zero LoRA B and a moved adapter."""
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                         host(state.trainable))
    return state.replace(trainable=jax.device_put(moved, jax.tree.map(
        lambda x: x.sharding, state.trainable)))


def _logits(task, variables, batch):
    text = sp.text_fields(batch)
    media = task.encode(variables, batch)
    hidden, _, _ = task.forward(variables, text, media, deterministic=True, rngs=None)
    return np.asarray(task.logits(variables, hidden))


@pytest.fixture(scope="module")
def media_setup():
    config = tiny_config("stage=mrdpo", "train.warmup_ratio=0.0", "train.lr=0.01")
    text_task = build_task(config, text_only=True)
    task = MediaTask(text_task.llm_config, text_task.lora_config)
    mesh = mesh_of(4)
    tx, schedule = st.make_optimizer(config.train, st.num_updates(config.train))
    state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
    data = dpo_examples(4, config.model.llm.vocab_size, length=16, seed=3)
    data["media"] = np.random.default_rng(2).normal(size=(4, MEDIA_DIM)).astype(np.float32)
    state = _trained_like(state)
    copies = {"params": host(state.params), **host(state.trainable)}   # before anything donates
    return config, task, mesh, tx, schedule, shardings, state, data, copies


def test_merge_boundary_keeps_logits_and_next_round_starts_at_log2(media_setup):
    config, task, mesh, tx, schedule, shardings, state, data, _ = media_setup
    lcfg = task.lora_config
    batch = {k[len("chosen_"):]: v for k, v in data.items() if k.startswith("chosen_")}
    batch["media"] = data["media"]
    before = _logits(task, present({"params": state.params, **host(state.trainable)}), batch)
    old_lora = host(state.trainable["lora"])
    adapter = host(state.trainable["adapter"])

    state = merge_round(state, lcfg, jax.random.PRNGKey(5), shardings, mesh)
    after = _logits(task, present({"params": state.params, **host(state.trainable)}), batch)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    assert np.abs(after - before).max() < 1e-5
    # fresh LoRA: B = 0, A redrawn; the adapter is carried over untouched
    for path, leaf in jax.tree_util.tree_flatten_with_path(host(state.trainable["lora"]))[0]:
        if path[-1].key == "b":
            assert not leaf.any()
    assert not np.allclose(host(state.trainable["lora"])["layers"]["self_attn"]["q_proj"]["a"],
                           old_lora["layers"]["self_attn"]["q_proj"]["a"])
    jax.tree.map(np.testing.assert_array_equal, host(state.trainable["adapter"]), adapter)

    # next round: fresh optimizer, reference = round-start adapter snapshot, LoRA off; the rng moves
    # on (each round drew the dropout keys of the round before)
    rng = host(state.rng)
    state, _ = prepare_state(task, config, tx, mesh, state=state)
    assert not np.array_equal(host(state.rng), rng)
    jax.tree.map(np.testing.assert_array_equal, host(state.ref_adapter), adapter)
    steps = sp.make_steps(task, config, tx, schedule, mesh, shardings)
    state, metrics = steps.train(state, device_batch(data, steps))
    assert float(metrics["dpo_loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["grad_norm"]) > 0   # the DPO gradient is not zero at h = 0


def test_merge_without_reinit_boundary_would_not_keep_the_policy(media_setup):
    """Control for the test above: keeping the trained LoRA on the merged base double-counts it."""
    _, task, _, _, _, _, _, data, copies = media_setup
    params, lora, adapter = copies["params"], copies["lora"], copies["adapter"]
    merged = merge(params, lora, task.lora_config.scale)
    double = present({"params": merged, "lora": lora, "adapter": adapter})
    single = present({"params": params, "lora": lora, "adapter": adapter})
    batch = {k[len("chosen_"):]: v for k, v in data.items() if k.startswith("chosen_")}
    batch["media"] = data["media"]
    assert np.abs(_logits(task, double, batch) - _logits(task, single, batch)).max() > 1e-3


def test_merge_round_on_the_av_layout():
    """AV layout: the LoRA sits under "llm" next to encoders that have q_proj kernels of their own."""
    kernel = np.ones((2, 3), np.float32)
    params = {"llm": {"q_proj": {"kernel": kernel, "bias": np.zeros(3, np.float32)}},
              "vision": {"q_proj": {"kernel": kernel}}}
    lora = {"llm": {"q_proj": {"a": np.ones((2, 1), np.float32), "b": np.ones((1, 3), np.float32)}}}
    state = st.TrainState(step=np.int32(3), params=params, trainable={"lora": lora, "adapter": {}},
                          opt_state={}, rng=jax.random.PRNGKey(0), ref_adapter={})
    cfg = LoraConfig(rank=1, alpha=2.0, targets=("q_proj",))
    out = merge_round(state, cfg, jax.random.PRNGKey(1))
    np.testing.assert_allclose(out.params["llm"]["q_proj"]["kernel"], kernel + 2.0)
    np.testing.assert_array_equal(out.params["vision"]["q_proj"]["kernel"], kernel)  # not adapted
    fresh = out.trainable["lora"]
    assert set(fresh) == {"llm"} and fresh["llm"]["q_proj"]["a"].shape == (2, 1)
    assert not np.asarray(fresh["llm"]["q_proj"]["b"]).any()
    with pytest.raises(ValueError, match="no 'lora' trainable"):
        merge_round(state.replace(trainable={"adapter": {}}), cfg, jax.random.PRNGKey(1))
