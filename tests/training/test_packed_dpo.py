"""Prefix-shared DPO (training/packing.py): one packed row per pair gives the unshared step's loss,
rewards, GT CE, reference log-probs and gradients (fp32, tiny AV model, uneven pairs, padding), on one
device and on an 8-device mesh; pairs whose prompts differ are refused by example_id.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_tasks import build, host, mesh_of, tiny_config

from vsalmonn_jax.models import attention, av_llm
from vsalmonn_jax.training import packing
from vsalmonn_jax.training import steps as sp
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES
from vsalmonn_jax.training.task import build_task

pytestmark = pytest.mark.xdist_group("packed_dpo")   # one worker builds the module fixture once

PH = 500
WIDTH = 16
# per pair: (prompt length incl. the placeholder, chosen, rejected, GT continuation lengths)
PAIRS = [(3, 5, 9, 4), (5, 11, 2, 7), (4, 1, 6, 12), (6, 7, 7, 3)]


def pair_batch(task, pairs=PAIRS, seed=0) -> dict:
    """Right-padded DPO batch: shared prompts with the media placeholder, uneven continuations, one
    continuation ending in a non-target token, one video with a padded frame slot."""
    n = len(pairs)
    base = av_llm.dummy_batch(task.av_config, batch=n, frames=2, chunks=1, text_len=WIDTH)
    rng = np.random.default_rng(seed)
    out = {k: v for k, v in base.items() if k not in ("input_ids", "attention_mask", "loss_mask")}
    out["pixel_values"] = rng.normal(size=out["pixel_values"].shape).astype(np.float32)
    out["mel"] = rng.normal(size=out["mel"].shape).astype(np.float32)
    out["frame_mask"][1, 1] = False
    prompts = [np.concatenate([[7, PH], rng.integers(3, 400, p - 2)]) for p, *_ in pairs]
    for k, prefix in enumerate(("chosen_", "rejected_", "gt_")):
        ids = np.zeros((n, WIDTH), np.int32)
        attn = np.zeros((n, WIDTH), bool)
        loss = np.zeros((n, WIDTH), bool)
        for row, (prompt, pair) in enumerate(zip(prompts, pairs, strict=True)):
            p, length = len(prompt), pair[k + 1]
            ids[row, :p + length] = np.concatenate([prompt, rng.integers(3, 400, length)])
            attn[row, :p + length] = True
            loss[row, p:p + length] = True
        loss[0, PAIRS[0][0] + PAIRS[0][1] - 1] = False  # a continuation's last token: no target
        out.update({prefix + "input_ids": ids, prefix + "attention_mask": attn,
                    prefix + "loss_mask": loss})
    out["example_id"] = np.arange(100, 100 + n)
    return out


def _perturbed(state, seed=1):
    """Random LoRA B / adapter moves so policy != reference and every gradient is non-trivial."""
    leaves, tree = jax.tree.flatten(host(state.trainable))
    rng = np.random.default_rng(seed)
    moved = [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    return state.replace(trainable=jax.tree.unflatten(tree, moved))


def _loss_and_grads(task, opts):
    def run(state, batch):
        media = sp._encode(task, state.params, batch)
        ref = sp.reference_logps(task, opts, state, batch, media)
        (loss, metrics), grads = jax.value_and_grad(
            lambda t: sp.dpo_loss(task, opts, state.params, t, batch, media, ref,
                                  deterministic=True), has_aux=True)(state.trainable)
        return loss, metrics, grads, ref

    return run


def _compare(shared, unshared):
    loss_s, metrics_s, grads_s, ref_s = shared
    loss_u, metrics_u, grads_u, ref_u = unshared
    np.testing.assert_allclose(loss_s, loss_u, atol=1e-5)
    for key in ("dpo_loss", "gt_ce", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "target_tokens"):
        np.testing.assert_allclose(metrics_s[key], metrics_u[key], atol=1e-5, rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(ref_s[0], ref_u[0], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(ref_s[1], ref_u[1], atol=1e-5, rtol=1e-6)
    flat_s, flat_u = jax.tree.leaves_with_path(grads_s), jax.tree.leaves(grads_u)
    for (path, a), b in zip(flat_s, flat_u, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert max(float(np.abs(g).max()) for g in flat_u) > 1e-3  # the gradients are not all ~0


@pytest.fixture(scope="module")
def av_setup():
    config = tiny_config("stage=dpo", "model.llm.attention_block=8")
    task = build_task(config, placeholder_id=PH)
    _, state, _ = build(config, mesh_of(1), task=task)
    state = _perturbed(state)
    batch = {k: v for k, v in pair_batch(task).items() if k != "example_id"}
    opts = sp.StepOptions.from_config(config)
    unshared = jax.device_get(jax.jit(_loss_and_grads(task, sp.StepOptions(
        **{**opts.__dict__, "shared_prefix": False})))(host(state), batch))
    return config, task, state, batch, opts, unshared


@pytest.mark.slow
def test_shared_equals_unshared_on_one_device(av_setup):
    config, task, state, batch, opts, unshared = av_setup
    assert opts.shared_prefix and sp.shares_prefix(task, opts)  # the default
    shared = jax.device_get(jax.jit(_loss_and_grads(task, opts))(host(state), batch))
    _compare(shared, unshared)
    assert float(unshared[1]["rewards/margins"]) != 0.0


@pytest.mark.slow
def test_shared_on_8_device_mesh_equals_unshared_on_one(av_setup):
    config, task, _, batch, opts, unshared = av_setup
    mesh = mesh_of(8, data=2, fsdp=2, tensor=2)
    _, state, steps = build(config, mesh, task=task)
    _, one_state, _ = build(config, mesh_of(1), task=task)
    values = jax.device_get(_perturbed(one_state))   # the same perturbed weights, now sharded
    state = jax.device_put(values, jax.tree.map(lambda x: x.sharding, state))
    fn = jax.jit(_loss_and_grads(task, opts), in_shardings=(jax.tree.map(lambda x: x.sharding, state),
                                                              steps.batch_sharding))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        shared = jax.device_get(fn(state, sp.put_batch(batch, steps.batch_sharding)))
    _compare(shared, unshared)


def test_pack_branches_layout():
    parts = [{"input_ids": jnp.asarray([[1, 2, 3, 4, 0]]), "attention_mask": jnp.asarray([[1, 1, 1, 1, 0]]),
              "loss_mask": jnp.asarray([[0, 0, 1, 1, 0]])},
             {"input_ids": jnp.asarray([[1, 2, 5, 0, 0]]), "attention_mask": jnp.asarray([[1, 1, 1, 0, 0]]),
              "loss_mask": jnp.asarray([[0, 0, 1, 0, 0]])}]
    packed = packing.pack_branches(parts)
    np.testing.assert_array_equal(packed["input_ids"][0], [1, 2, 3, 4, 5, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["branch_ids"][0], [0, 0, 1, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["attention_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    # the rejected token (index 4) is predicted from the last prompt token (index 1)
    np.testing.assert_array_equal(packing.predicting_index(packed["branch_ids"], packed["attention_mask"])[0],
                                  [0, 0, 1, 2, 1, 4, 5, 6, 7, 8])
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 3)), jnp.float32)
    aligned = packing.align(dict(packing.packed_output(hidden, packed), targets=packed["input_ids"]))[0]
    index = packing.predicting_index(packed["branch_ids"], packed["attention_mask"])
    np.testing.assert_array_equal(aligned, jnp.take_along_axis(hidden, index[..., None], axis=1))
    from vsalmonn_jax.models.qwen2 import branch_positions
    np.testing.assert_array_equal(branch_positions(packed["attention_mask"], packed["branch_ids"])[0][:5],
                                  [0, 1, 2, 3, 2])


def test_a_ce_only_row_takes_its_prompt_from_the_gt():
    """mrDPO's CE-only rows: chosen / rejected empty (no target), the GT alone defines the prompt."""
    empty = {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.zeros((1, 4), bool),
             "loss_mask": jnp.zeros((1, 4), bool)}
    gt = {"input_ids": jnp.asarray([[7, 8, 9, 6]]), "attention_mask": jnp.ones((1, 4), bool),
          "loss_mask": jnp.asarray([[False, False, True, True]])}
    packed = packing.pack_branches([empty, empty, gt])
    np.testing.assert_array_equal(packed["input_ids"][0, :4], [7, 8, 9, 6])
    np.testing.assert_array_equal(packed["branch_ids"][0, :5], [0, 0, 3, 3, 0])
    np.testing.assert_array_equal(packed["loss_mask"][0, :5], [0, 0, 1, 1, 0])
    batch = {p + k: np.asarray(v) for p, part in zip(("chosen_", "rejected_", "gt_"), (empty, empty, gt),
                                                     strict=True) for k, v in part.items()}
    packing.check_shared_prompts(batch, ("chosen_", "rejected_", "gt_"))


def test_pairs_with_different_prompts_are_refused_by_example_id():
    task = build_task(tiny_config("stage=dpo"), placeholder_id=PH)
    batch = pair_batch(task)
    packing.check_shared_prompts(batch, sp.PAIR_PREFIXES + ("gt_",))
    batch["rejected_input_ids"][2, 2] += 1
    with pytest.raises(ValueError, match="example_id 102: the rejected_prompt differs"):
        packing.check_shared_prompts(batch, sp.PAIR_PREFIXES)


def test_auto_attention_uses_xla_where_the_platform_kernel_lacks_the_prefix_mask(monkeypatch):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention.check_supported("auto", {"padding"}) == "cudnn"
    assert attention.check_supported("auto", {"padding", "prefix"}) == "xla"
    with pytest.raises(ValueError, match="cannot express"):
        attention.check_supported("cudnn", {"prefix"})
