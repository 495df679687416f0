"""Context parallelism (mesh axis `context`): the load-balanced layout, attention with K/V all-gathered
over context, and SFT / prefix-shared DPO forward logits and gradients of the tiny AV model equal to
one device.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from toy_tasks import host, mesh_of, tiny_config

from vsalmonn_jax.models import av_llm
from vsalmonn_jax.models.attention import (
    MaskSpec,
    attention,
    balanced_layout,
    natural_layout,
    padded_length,
    xla_attention,
)
from vsalmonn_jax.models.attention.mask import natural_order
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training import steps as sp
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES
from vsalmonn_jax.training.task import build_task, present

PH = 500
TEXT = 12


def test_balanced_layout_gives_each_shard_chunks_i_and_2c_minus_1_minus_i():
    np.testing.assert_array_equal(natural_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    order = natural_order(16, 4).reshape(4, 4)  # shard i: chunks i and 7 - i
    for i in range(4):
        np.testing.assert_array_equal(order[i], [2 * i, 2 * i + 1, 2 * (7 - i), 2 * (7 - i) + 1])
    work = [sum(int(t) + 1 for t in row) for row in natural_order(64, 4).reshape(4, 16)]
    assert len(set(work)) == 1  # every shard holds the same number of causal (query, key) pairs
    x = np.random.default_rng(0).normal(size=(2, 24, 3))
    np.testing.assert_array_equal(natural_layout(balanced_layout(x, 3), 3), x)
    np.testing.assert_array_equal(balanced_layout(x, 3)[0, :, 0], x[0, natural_order(24, 3), 0])
    assert padded_length(83, 4) == 88 and padded_length(88, 4) == 88


def _qkv(rng, batch=4, length=48, heads=4, kv_heads=2, dim=8):
    q = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("axes", [{"data": 2, "context": 4}, {"fsdp": 2, "context": 2, "tensor": 2}])
def test_context_attention_equals_one_device(axes, rng):
    """Padding, packed segments and shared-prefix branches, forward and gradients (fp32)."""
    q, k, v = _qkv(rng)
    batch, length = q.shape[:2]
    ids = {"key_mask": jnp.asarray(rng.random((batch, length)) > 0.2),
           "segment_ids": jnp.asarray(np.sort(rng.integers(0, 2, (batch, length)), axis=1)),
           "branch_ids": jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1))}
    parts = axes["context"]

    def one(q, k, v):
        return xla_attention(q, k, v, MaskSpec(True, **ids), block=8)

    def split(q, k, v):
        spec = MaskSpec(True, context=parts, **{n: balanced_layout(x, parts) for n, x in ids.items()})
        out = attention(*(balanced_layout(x, parts) for x in (q, k, v)), spec, "xla", 8)
        return natural_layout(out, parts)

    def value_and_grads(fn):
        return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)

    want_out, (want, want_grads) = one(q, k, v), value_and_grads(one)
    with jax.set_mesh(mesh_of(8, **axes)), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        got_out = jax.jit(split)(q, k, v)
        got, got_grads = jax.jit(lambda: value_and_grads(split))()
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    dense = MaskSpec(True, context=parts, **{n: balanced_layout(x, parts) for n, x in ids.items()})
    np.testing.assert_array_equal(  # the reference mask reads the natural order too
        natural_layout(natural_layout(dense.dense(length, length), parts), parts, axis=2),
        MaskSpec(True, **ids).dense(length, length))


def _av_batch(task, prefixes, n=2):
    """AV rows (2 frames + 1 audio chunk) whose media span several context chunks; row 1 padded;
    the sets share their prompt (tokens before 5, the placeholder at 1), as DPO pairs do."""
    base = av_llm.dummy_batch(task.av_config, batch=n, frames=2, chunks=1, text_len=TEXT)
    rng = np.random.default_rng(0)
    out = {k: v for k, v in base.items() if k not in ("input_ids", "attention_mask", "loss_mask")}
    out["pixel_values"] = rng.normal(size=out["pixel_values"].shape).astype(np.float32)
    out["mel"] = rng.normal(size=out["mel"].shape).astype(np.float32)
    prompt = rng.integers(3, 400, size=(n, 5)).astype(np.int32)
    prompt[:, 1] = PH
    for prefix in prefixes:
        ids = rng.integers(3, 400, size=(n, TEXT)).astype(np.int32)
        ids[:, :5] = prompt
        attn = np.ones((n, TEXT), bool)
        attn[1, -3:] = False
        loss = np.zeros((n, TEXT), bool)
        loss[:, 5:] = True
        out.update({prefix + "input_ids": ids, prefix + "attention_mask": attn,
                    prefix + "loss_mask": loss & attn})
    return out


def _loss_grads_logits(task, config, mesh, batch, objective):
    """(loss, metrics, gradients w.r.t. the trainables, logits of the first sequence set) on `mesh`."""
    tx, _ = st.make_optimizer(config.train, 10)
    state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
    opts = sp.StepOptions.from_config(config)
    first = "" if objective == "sft" else "chosen_"

    def run(state, batch):
        media = sp._encode(task, state.params, batch)
        if objective == "sft":
            loss_fn = lambda t: sp.sft_loss(task, opts, state.params, t, batch, deterministic=True)
        else:
            ref = sp.reference_logps(task, opts, state, batch, media)
            loss_fn = lambda t: sp.dpo_loss(task, opts, state.params, t, batch, media, ref,
                                            deterministic=True)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        variables = present({"params": state.params, **state.trainable})
        hidden, _, _ = task.forward(variables, sp.text_fields(batch, first), media, deterministic=True,
                                    rngs=None)
        return loss, metrics, grads, task.logits(variables, hidden)

    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(run, in_shardings=(shardings, data))(state, sp.put_batch(batch, data))
    return host(out)


_BASELINE = {}  # objective -> the one-device results (shared by the context = 2 and 4 tests)


def _check_equal(task, objective, axes):
    config = tiny_config(f"stage={objective}", "train.warmup_ratio=0.0", "train.logits_chunk=16")
    # DPO runs prefix-shared: one packed row per pair, its branch ids and positions permuted too
    assert objective == "sft" or sp.shares_prefix(task, sp.StepOptions.from_config(config))
    prefixes = ("",) if objective == "sft" else ("chosen_", "rejected_", "gt_")
    batch = _av_batch(task, prefixes)
    media = task.av_config.media_length(2, 1)
    chunk = padded_length(TEXT + media - 1, axes["context"]) // (2 * axes["context"])
    assert media > 2 * chunk  # the media tokens land on several context shards
    if objective not in _BASELINE:
        _BASELINE[objective] = _loss_grads_logits(task, config, mesh_of(1), batch, objective)
    want = _BASELINE[objective]
    got = _loss_grads_logits(task, config, mesh_of(8, **axes), batch, objective)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, err_msg=f"{objective} loss")
    for key in set(want[1]) - {"rewards/accuracy"}:  # at init policy = reference: rewards tie at 0
        np.testing.assert_allclose(got[1][key], want[1][key], atol=1e-5, err_msg=key)
    leaves = jax.tree_util.tree_leaves_with_path(want[2])
    assert len(leaves) > 10 and max(float(np.abs(g).max()) for _, g in leaves) > 1e-4
    for (path, a), b in zip(leaves, jax.tree.leaves(got[2]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=f"{objective} grad {jax.tree_util.keystr(path)}")
    np.testing.assert_allclose(got[3], want[3], atol=1e-5, err_msg=f"{objective} logits")


@pytest.fixture(scope="module")
def av_task():
    return build_task(tiny_config(), placeholder_id=PH)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_context_2_with_fsdp_and_tensor_equals_one_device(av_task, objective):
    _check_equal(av_task, objective, {"data": 1, "fsdp": 2, "context": 2, "tensor": 2})


@pytest.mark.slow
def test_context_4_with_fsdp_equals_one_device(av_task):
    """DPO (policy with the ground truth, reference forward, forward logits) on 8 chunks."""
    _check_equal(av_task, "dpo", {"data": 1, "fsdp": 2, "context": 4})
