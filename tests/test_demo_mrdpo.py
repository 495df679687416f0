"""The demo's mrDPO arms through training/mrdpo.py: the cached-features PolicyEnv (state layout,
batch-independent sampling, pair / control batches) and a SIGTERM mid-round that resumes to the
same trainables and stage records as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import signal

import jax
import numpy as np
import pytest

TIMINGS = ("train_s", "eval_s", "load_avg")
TINY = ["--config.demo.n_train=8", "--config.demo.n_val=4", "--config.demo.n_test=8", "--config.demo.n_fresh=8",
        "--config.demo.eval_batch=8", "--config.demo.batch_size=8", "--config.demo.dpo_steps=3",
        "--config.demo.render_workers=1", "--config.mrdpo.rounds=2",
        # 8 barely trained clips: with 4 samples each, round 2's samples all tied (no pair)
        "--config.mrdpo.samples_per_video=8"]


def _config():
    from vsalmonn_jax.commands.demo import demo_config

    return demo_config(True, None, TINY)


def test_cached_task_state_has_the_demo_model_layout():
    import flax.linen as nn

    from vsalmonn_jax.demo import model as model_lib
    from vsalmonn_jax.models.av_llm import init_variables

    av_cfg, lcfg = model_lib.configs(_config(), placeholder_id=3)
    task = model_lib.CachedAVTask(av_cfg, lcfg)
    state = nn.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
    demo = nn.unbox(jax.eval_shape(lambda r: init_variables(r, av_cfg, lcfg), jax.random.PRNGKey(0)))
    shape = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shape(state["params"]) == shape({"llm": demo["params"]["llm"]})
    assert shape(state["adapter"]) == shape(demo["adapter"])
    assert shape(state["lora"]) == shape(demo["lora"])


@pytest.fixture(scope="module")
def demo_ctx(tmp_path_factory):
    from vsalmonn_jax.demo.pipeline import setup
    from vsalmonn_jax.lora import init_lora

    root = tmp_path_factory.mktemp("demo")
    ctx, base = setup(_config(), root / "a", root / "data", lambda message: None)
    lora = init_lora(jax.random.PRNGKey(1), base["params"]["llm"], ctx.task.model.lora)
    noise = np.random.default_rng(0)   # an SFT-like LoRA (B != 0): merged before round 1
    lora = jax.tree.map(lambda x: np.asarray(x) + 0.02 * noise.standard_normal(x.shape).astype(
        np.float32), jax.device_get(lora))
    return ctx, dict(base, lora={"llm": lora})


@pytest.mark.slow
def test_env_samples_independently_of_batching_and_batches_both_record_kinds(demo_ctx):
    from vsalmonn_jax.demo.env import DemoPolicyEnv, policy_state
    from vsalmonn_jax.demo.pipeline import arm_config
    from vsalmonn_jax.generate.sampling import SamplingConfig
    from vsalmonn_jax.training.mrdpo import control_records
    from vsalmonn_jax.training.sharding import make_mesh

    ctx, pre = demo_ctx
    cfg = arm_config(ctx.config, control=False)
    state = policy_state(ctx.task, cfg, pre, make_mesh(dict(cfg.mesh)), 0)
    items = ctx.data["fresh"]["items"][:3] + ctx.data["test"]["items"][:2]
    sampling, rng = SamplingConfig(greedy=False, top_p=0.9), jax.random.PRNGKey(5)
    wide = DemoPolicyEnv(ctx.task, ctx.tokens, ctx.data, sample_batch=8).generate(
        state, items, sampling=sampling, rng=rng, max_new_tokens=12)
    narrow = DemoPolicyEnv(ctx.task, ctx.tokens, ctx.data, sample_batch=2).generate(
        state, items[::-1], sampling=sampling, rng=rng, max_new_tokens=12)
    assert len(wide) == 5 and any(s.text for s in wide)
    again = DemoPolicyEnv(ctx.task, ctx.tokens, ctx.data, sample_batch=2).generate(
        state, items, sampling=sampling, rng=rng, max_new_tokens=12)
    assert [s.text for s in again] == [s.text for s in wide]   # row g's key: fold_in(rng, g)
    assert len(narrow) == 5

    env = DemoPolicyEnv(ctx.task, ctx.tokens, ctx.data, sample_batch=8)
    pairs = [{"video_id": it["id"], "prompt": cfg.generate.prompt, "chosen": it["exact"],
              "rejected": it["annotated"], "gt": it["annotated"]} for it in items[:3]]
    batch = next(env.batches(pairs, batch_size=8, seed=0))
    assert batch["chosen_input_ids"].shape == (8, ctx.tokens.length)
    assert {"rejected_loss_mask", "gt_input_ids", "vision", "audio"} <= set(batch)
    row = ctx.data["fresh"]["items"].index(items[int(batch["example_id"][0])])
    np.testing.assert_array_equal(batch["vision"][0], ctx.data["fresh"]["media"]["vision"][row])
    control = control_records([dict(it, caption=it["annotated"]) for it in items], "Describe.")
    batch = next(env.batches(control, batch_size=8, seed=0, shuffle=False, repeat=False))
    assert batch["input_ids"].shape == (8, ctx.tokens.length) and "chosen_input_ids" not in batch
    with pytest.raises(ValueError, match="one record layout"):
        env.batches(pairs + control, batch_size=8, seed=0)


def _stage_files(run_dir, names):
    out = {}
    for name in names:
        record = json.loads((run_dir / "stages" / name / "eval.json").read_text())
        out[name] = ({k: v for k, v in record.items() if k not in TIMINGS},
                     (run_dir / "stages" / name / "captions.jsonl").read_text())
    return out


@pytest.mark.slow
def test_sigterm_mid_round_resumes_to_the_uninterrupted_result(demo_ctx, tmp_path):
    from vsalmonn_jax.demo.pipeline import Preempted, arm_model, mrdpo_arm

    ctx, pre = demo_ctx
    names = ["mrdpo_1", "mrdpo_2"]
    records = mrdpo_arm(ctx, pre, "mrdpo")
    assert list(records) == names and records["mrdpo_1"]["stats"]["pairs"] > 0
    want = arm_model(ctx, pre, "mrdpo", 2)

    stopped = dataclasses.replace(ctx, run_dir=tmp_path)
    logs = []
    stopped.log = logs.append

    def on_step(r, step, metrics):
        if (r, step) == (1, 2):
            signal.raise_signal(signal.SIGTERM)   # to this (main) thread; the loop saves after the step

    with pytest.raises(Preempted, match=r"\[mrdpo_2\] preempted .* step 2"):
        mrdpo_arm(stopped, pre, "mrdpo", on_step=on_step)
    assert (tmp_path / "stages" / "mrdpo_1" / "done").exists()
    assert not (tmp_path / "stages" / "mrdpo_2").exists()
    assert (tmp_path / "rounds" / "mrdpo" / "round_1" / "checkpoints" / "2").is_dir()

    logs.clear()
    resumed = mrdpo_arm(stopped, pre, "mrdpo")
    assert "[mrdpo_1] finished earlier: skipped" in " ".join(logs)
    assert [m for m in logs if m.startswith("[mrdpo_2] step")][0].startswith("[mrdpo_2] step 3/3")
    got = arm_model(stopped, pre, "mrdpo", 2)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert _stage_files(tmp_path, names) == _stage_files(ctx.run_dir, names)
    assert {n: r["stats"] for n, r in resumed.items()} == {n: r["stats"] for n, r in records.items()}


@pytest.mark.slow
def test_qa_option_scoring_is_batch_independent_and_reads_the_clip(demo_ctx):
    """QA answers = the option sentence with the highest summed log-probability (teacher forcing);
    the scores do not depend on batching, and do depend on the clip's media."""
    from vsalmonn_jax.data.event_qa import event_qa_prompt
    from vsalmonn_jax.demo.caption import Captioner

    ctx, pre = demo_ctx
    split = ctx.data["test"]
    captioner = Captioner(ctx.task, ctx.tokens, pre)
    questions, predictions = captioner.answers(split, batch=8)
    assert questions and set(predictions) == {q["id"] for q in questions}
    rows, texts = [], []
    for r, item in enumerate(split["items"]):
        for qa in item["qa"]:
            rows += [r] * 4
            texts += [ctx.tokens.response_row(o, event_qa_prompt(qa["question"], qa["options"]))
                      for o in qa["options"]]
    rows = np.asarray(rows)
    wide = captioner.response_logps(split["media"], rows, texts, batch=8)
    narrow = captioner.response_logps(split["media"], rows, texts, batch=3)
    np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-4)
    assert [chr(65 + int(np.argmax(wide[4 * k: 4 * k + 4]))) for k in range(len(questions))] == \
        [predictions[q["id"]] for q in questions]
    shuffled = captioner.response_logps(split["media"], (rows + 1) % len(split["items"]), texts, batch=8)
    assert np.abs(shuffled - wide).max() > 1e-3
