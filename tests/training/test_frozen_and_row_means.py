"""The release's 7B LoRA stages, as configs/7b*.py ask: speech_llama_proj (our audio_proj) stays as
stage 1 left it (train.frozen), and the SFT loss is a mean of per-row token means (train.ce_mean=rows:
the release trains one row per device and averages the gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vsalmonn_jax.config import load_config
from vsalmonn_jax.training import losses
from vsalmonn_jax.training import state as st


def test_row_mean_weighs_each_row_once():
    """7 short QA answers (6 tokens, CE 3) and one 400-token caption (CE 1), a row each: the release
    averages per-row means (2.75); pooling the tokens weighs the caption 0.9 (1.19)."""
    mask = np.zeros((9, 400), bool)
    mask[:7, :6] = True
    mask[7] = True                                        # row 8: padding (no target)
    logps = np.where(np.arange(9)[:, None] < 7, -3.0, -1.0).astype(np.float32)
    logps = np.broadcast_to(logps, mask.shape)
    rows, count = losses.masked_ce(jnp.asarray(logps), jnp.asarray(mask), "rows")
    tokens, _ = losses.masked_ce(jnp.asarray(logps), jnp.asarray(mask), "tokens")
    assert float(rows) == pytest.approx((7 * 3.0 + 1.0) / 8)
    assert float(tokens) == pytest.approx((42 * 3.0 + 400) / 442)
    assert float(count) == 442
    with pytest.raises(ValueError, match="ce_mean must be one of"):
        losses.masked_ce(jnp.asarray(logps), jnp.asarray(mask), "videos")


def _train_cfg(**kw):
    c = load_config("tiny").train
    # eps 1: Adam's update then scales with the (clipped) gradient, so clipping shows in it
    c.update(dict(lr=0.1, warmup_ratio=0.0, schedule="constant", grad_clip=1.0, eps=1.0, **kw))
    return c


def _updates(train_cfg, grads, steps=3, start=0.0):
    tx, _ = st.make_optimizer(train_cfg, steps)
    params = jax.tree.map(lambda g: jnp.full_like(g, start), grads)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_frozen_trainables_get_no_update_and_stay_out_of_the_clip_norm():
    grads = {"lora": {"q": jnp.full((4,), 0.5)},
             "adapter": {"audio_connector": {"audio_proj": {"kernel": jnp.full((3, 3), 100.0)},
                                             "query": jnp.full((2,), 0.5)}}}
    frozen = ("adapter/audio_connector/audio_proj",)
    params, _ = _updates(_train_cfg(frozen=frozen), grads)
    assert not np.any(np.asarray(params["adapter"]["audio_connector"]["audio_proj"]["kernel"]))
    free, _ = _updates(_train_cfg(), {k: v for k, v in grads.items()})
    moved = np.asarray(params["lora"]["q"])
    assert np.all(moved != 0)
    # the frozen kernel's huge gradient did not shrink the others' clipped update (global norm over
    # the trained leaves only): the same as training them alone
    alone = {"lora": grads["lora"], "adapter": {"audio_connector": {
        "query": grads["adapter"]["audio_connector"]["query"]}}}
    ref, _ = _updates(_train_cfg(), alone)
    np.testing.assert_allclose(moved, np.asarray(ref["lora"]["q"]), rtol=1e-6)
    assert not np.allclose(np.asarray(free["lora"]["q"]), moved)   # unfrozen: clipped by the kernel
    # with weight decay too (AdamW's decay would move it)
    decayed, _ = _updates(_train_cfg(frozen=frozen, weight_decay=0.5), grads, start=1.0)
    np.testing.assert_array_equal(
        np.asarray(decayed["adapter"]["audio_connector"]["audio_proj"]["kernel"]), 1.0)
    with pytest.raises(ValueError, match="names no trainable parameter"):
        _updates(_train_cfg(frozen=("adapter/audio_conector/audio_proj",)), grads)


def test_7b_presets_freeze_audio_proj_in_the_lora_stages_only():
    for name in ("7b_sft", "7b_dpo", "7b_mrdpo", "7b_rebirth"):
        config = load_config(name)
        assert tuple(config.train.frozen) == ("adapter/audio_connector/audio_proj",), name
        assert config.train.ce_mean == "rows"
    assert tuple(load_config("7b_align").train.frozen) == ()
    assert tuple(load_config("tiny_sft").train.frozen) == () and load_config("tiny").train.ce_mean \
        == "tokens"
    # the path names a real leaf of the 7B model's trainables (checked without allocating them)
    from vsalmonn_jax.training.task import build_task

    config = load_config("7b_sft")
    task = build_task(config, text_only=False)
    abstract = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), ("lora", "adapter")))
    trainable = {c: abstract[c] for c in ("lora", "adapter")}
    labels = st.frozen_labels(tuple(config.train.frozen))(trainable)
    frozen = [x for x in jax.tree.leaves(labels) if x == "frozen"]
    assert len(frozen) == 2                                   # its kernel and bias
    text = st.frozen_labels(("adapter/audio_connector/audio_proj",))({"lora": {"q": np.zeros(2)}})
    assert text == {"lora": {"q": "train"}}                  # the text-only task has no adapter


def test_weight_decay_spares_biases_and_norm_scales_as_hf_does():
    """HF's Trainer decays every parameter but biases and LayerNorm weights; AdamW decayed all."""
    grads = {"adapter": {"proj": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))},
                         "norm": {"scale": jnp.zeros((2,))}}}
    params, _ = _updates(_train_cfg(weight_decay=0.5), grads, start=1.0)
    assert np.all(np.asarray(params["adapter"]["proj"]["kernel"]) < 1.0)
    np.testing.assert_array_equal(np.asarray(params["adapter"]["proj"]["bias"]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["adapter"]["norm"]["scale"]), 1.0)
    labels = st.decayed({"a": {"bias": {"value": 0}, "kernel": {"value": 0}}})   # boxed leaves
    assert labels == {"a": {"bias": {"value": False}, "kernel": {"value": True}}}
