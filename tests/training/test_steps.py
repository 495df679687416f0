"""Tests for training/steps.py + state.py: frozen base untouched, DPO at init = log 2, sharded =
single-device, LoRA-DPO moves on a sharded mesh, media encoded once, reference variants, accumulation.
"""

import math

import jax
import numpy as np
import pytest
from toy_tasks import MEDIA_DIM, MediaTask, build, device_batch, host, mesh_of, tiny_config

from vsalmonn_jax.training import synthetic
from vsalmonn_jax.training.task import build_task

LOG2 = math.log(2.0)


def _sft_batch(n=8, length=16, seed=0):
    return synthetic.sft_examples(n, 512, length, seed)


def _dpo_batch(n=8, length=16, seed=0, with_gt=True):
    return synthetic.dpo_examples(n, 512, length, seed, with_gt=with_gt)


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                       strict=True))


def test_sft_steps_touch_only_trainables():
    config = tiny_config("stage=sft")
    _, state, steps = build(config, mesh_of(8))
    params0, train0, opt0 = host(state.params), host(state.trainable), host(state.opt_state)
    batch = device_batch(_sft_batch(), steps)
    for _ in range(3):
        state, metrics = steps.train(state, batch)
    assert int(state.step) == 3 and float(metrics["finite"]) == 1.0
    for x, y in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params0), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bit-identical frozen base
    assert _changed(host(state.trainable), train0) and _changed(host(state.opt_state), opt0)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.trainable))
    assert set(state.trainable) == {"lora", "adapter"} and "lora" in state.trainable
    assert float(metrics["tokens"]) == float(_sft_batch()["attention_mask"].sum())


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    for stage, make in (("sft", _sft_batch), ("dpo", _dpo_batch)):
        config = tiny_config(f"stage={stage}")
        results = []
        for mesh in (mesh_of(1), mesh_of(8, data=2, fsdp=2, tensor=2)):
            _, state, steps = build(config, mesh)
            batch = device_batch(make(), steps)
            losses = []
            for _ in range(2):
                state, metrics = steps.train(state, batch)
                losses.append(float(metrics["loss"]))
            results.append((host(state.trainable), losses, host(state.params)))
        (t1, l1, p1), (t8, l8, p8) = results
        np.testing.assert_allclose(l8, l1, atol=1e-5, err_msg=stage)
        for a, b in zip(jax.tree.leaves(t8), jax.tree.leaves(t1), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=stage)
        for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
            np.testing.assert_array_equal(a, b)  # same init whatever the sharding


def test_lora_dpo_starts_at_log2_and_moves_on_sharded_mesh():
    config = tiny_config("stage=dpo", "dpo.gt_ce_weight=0.0", "train.warmup_ratio=0.0")
    _, state, steps = build(config, mesh_of(8, data=2, fsdp=2, tensor=2))
    lora_b = [x for x in jax.tree.leaves(state.trainable["lora"]) if x.shape[-2] == 8]
    assert lora_b and all(float(abs(np.asarray(b)).max()) == 0.0 for b in lora_b)  # B = 0 at init
    batch = device_batch(_dpo_batch(with_gt=False), steps)
    history = []
    for _ in range(8):
        state, metrics = steps.train(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["loss"] < LOG2 - 0.02
    assert history[-1]["rewards/margins"] > history[1]["rewards/margins"] > 0
    assert history[-1]["rewards/accuracy"] == 1.0
    assert "gt_ce" not in history[0]


def test_precomputed_reference_logps_give_the_same_step():
    config = tiny_config("stage=dpo")
    mesh = mesh_of(8)
    _, state, steps = build(config, mesh)
    data = _dpo_batch()
    batch = device_batch(data, steps)
    m_eval = steps.eval(state, batch)
    # precomputed reference = the policy's own log-probs at init (LoRA B = 0, no adapter)
    pre = dict(data, ref_chosen_logps=np.full(8, 0, np.float32), ref_rejected_logps=np.zeros(8, np.float32))
    pre["ref_chosen_logps"] = np.asarray(_seq_logps(steps, state, data, "chosen_"))
    pre["ref_rejected_logps"] = np.asarray(_seq_logps(steps, state, data, "rejected_"))
    reference = steps.reference(state, batch)  # the jitted precompute path agrees
    np.testing.assert_allclose(np.asarray(reference["ref_chosen_logps"]), pre["ref_chosen_logps"],
                               atol=1e-4)
    m_pre = steps.eval(state, device_batch(pre, steps))
    assert float(m_pre["loss"]) == pytest.approx(float(m_eval["loss"]), abs=1e-6)
    assert float(m_pre["dpo_loss"]) == pytest.approx(LOG2, abs=1e-6)
    # a different precomputed reference really is used
    pre["ref_chosen_logps"] = pre["ref_chosen_logps"] - 5.0
    m_shift = steps.eval(state, device_batch(pre, steps))
    assert float(m_shift["rewards/chosen"]) == pytest.approx(0.5, abs=1e-4)


def _seq_logps(steps, state, data, prefix):
    """Summed response log-probs of one sequence set, computed directly from the policy."""
    from vsalmonn_jax.training import losses
    from vsalmonn_jax.training import steps as sp

    task = build_task(tiny_config(), text_only=True)
    text = {k: data[prefix + k] for k in ("input_ids", "attention_mask", "loss_mask")}

    @jax.jit
    def run(variables, text):
        lp, mask = sp._token_logps(task, variables, text, None, sp.StepOptions(),
                                   deterministic=True, rngs=None)
        return losses.sequence_logps(lp, mask)

    return run({"params": state.params, **state.trainable}, text)


def test_media_encoded_once_and_reference_snapshot():
    config = tiny_config("stage=dpo", "train.warmup_ratio=0.0", "train.lr=0.01")
    task = MediaTask(build_task(config, text_only=True).llm_config,
                     build_task(config, text_only=True).lora_config)
    _, state, steps = build(config, mesh_of(8), task=task)
    adapter0 = host(state.trainable["adapter"])
    data = _dpo_batch()
    data["media"] = np.random.default_rng(1).normal(size=(8, MEDIA_DIM)).astype(np.float32)
    batch = device_batch(data, steps)
    before = MediaTask.encode_calls
    for _ in range(4):
        state, metrics = steps.train(state, batch)
    assert MediaTask.encode_calls - before == 1  # one trace, one encode for policy + reference
    assert _changed(host(state.trainable["adapter"]), adapter0)
    for a, b in zip(jax.tree.leaves(host(state.ref_adapter)), jax.tree.leaves(adapter0), strict=True):
        np.testing.assert_array_equal(a, b)  # the reference keeps the round-start adapter
    snap = steps.eval(state, batch)
    quirk_config = tiny_config("stage=dpo", "dpo.reference=lora_disabled")
    from vsalmonn_jax.training import state as st
    from vsalmonn_jax.training import steps as sp
    tx, schedule = st.make_optimizer(quirk_config.train, 20)
    _, shardings = st.state_shardings(task, config, tx, steps.mesh)
    quirk = sp.make_steps(task, quirk_config, tx, schedule, steps.mesh, shardings)
    q = quirk.eval(state, batch)
    assert float(q["logps/chosen"]) == pytest.approx(float(snap["logps/chosen"]), abs=1e-5)
    assert abs(float(q["rewards/chosen"]) - float(snap["rewards/chosen"])) > 1e-4


def test_gradient_accumulation_updates_every_k_steps():
    config = tiny_config("stage=sft", "train.grad_accum=2", "train.warmup_ratio=0.0")
    _, state, steps = build(config, mesh_of(8))
    train0 = host(state.trainable)
    batch = device_batch(_sft_batch(), steps)
    state, m1 = steps.train(state, batch)
    assert not _changed(host(state.trainable), train0)
    state, m2 = steps.train(state, batch)
    assert _changed(host(state.trainable), train0)
    assert float(m1["lr"]) == float(m2["lr"]) == pytest.approx(1e-3)


def test_7b_state_is_sharded_from_its_shapes_alone():
    """The 7B state's shardings come from eval_shape (nothing allocated): fsdp splits the base."""
    from vsalmonn_jax.training import state as st

    config = tiny_config()
    seven = __import__("vsalmonn_jax.config", fromlist=["load_config"]).load_config("7b")
    config.model.llm = seven.model.llm
    config.model.lora = seven.model.lora
    task = build_task(config, text_only=True)
    tx, _ = st.make_optimizer(config.train, 10)
    mesh = mesh_of(8, data=1, fsdp=8, tensor=1)
    abstract, shardings = st.state_shardings(task, config, tx, mesh)
    values = st.values(abstract)
    kernel = values.params["layers"]["mlp"]["down_proj"]["kernel"]
    assert kernel.shape == (28, 18944, 3584) and str(kernel.dtype) == "bfloat16"
    spec = shardings.params["layers"]["mlp"]["down_proj"]["kernel"].spec
    assert tuple(spec) == (None, "tensor", "fsdp")  # [layers, mlp, embed]
    shard = shardings.params["lm_head"]["kernel"].shard_shape((3584, 152064))
    assert shard == (448, 152064)  # embed / 8
    lora_a = values.trainable["lora"]["layers"]["self_attn"]["q_proj"]["a"]
    assert lora_a.shape == (28, 3584, 128) and str(lora_a.dtype) == "float32"
    mu = values.opt_state[1][0].mu["lora"]["layers"]["self_attn"]["q_proj"]["a"]
    assert str(mu.dtype) == "float32"
