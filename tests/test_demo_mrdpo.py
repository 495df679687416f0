"""The demo's mrDPO arms through training/mrdpo.py: the cached-features PolicyEnv (state layout,
batch-independent sampling, pair / control batches) and a SIGTERM mid-round that resumes, in a new
process as a preempted job does, to the same trainables and stage records as an uninterrupted run."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import fake_devices
import jax
import numpy as np
import pytest
from demo_mrdpo_child import STOP_AT, pre_dpo, tiny_config
from machine import scaled

TIMINGS = ("train_s", "eval_s", "load_avg")
CHILD = pathlib.Path(__file__).with_name("demo_mrdpo_child.py")


def test_cached_task_state_has_the_demo_model_layout():
    import flax.linen as nn

    from vsalmonn_jax.demo import model as model_lib
    from vsalmonn_jax.models.av_llm import init_variables

    av_cfg, lcfg = model_lib.configs(tiny_config(), placeholder_id=3)
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

    root = tmp_path_factory.mktemp("demo")
    ctx, base = setup(tiny_config(), root / "a", root / "data", lambda message: None)
    return ctx, pre_dpo(ctx, base)


@pytest.mark.slow
def test_env_samples_independently_of_batching_and_batches_both_record_kinds(demo_ctx):
    """Pair records (a pair whose clip has no GT caption among them: an empty GT row) and control
    (SFT) records; one stream takes one kind."""
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
    no_gt = {k: v for k, v in pairs[2].items() if k != "gt"}   # a clip its annotator wrote nothing for
    mixed = next(env.batches([no_gt, *pairs[:2]], batch_size=3, seed=0, shuffle=False))
    assert [bool(m.any()) for m in mixed["gt_loss_mask"]] == [False, True, True]   # no CE term
    assert all(m.any() for m in mixed["chosen_loss_mask"]) and all(m.any() for m in mixed["rejected_loss_mask"])
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


def _arm(mode: str, data_dir: pathlib.Path, run_dir: pathlib.Path) -> tuple[dict, dict]:
    """demo_mrdpo_child.py MODE in a new process on one CPU device (as users run the demo): its
    JSON result and, for a finished arm, its final model's arrays. A crash shows the child's stderr."""
    out = run_dir.parent / f"{run_dir.name}-{mode}"
    env = fake_devices.env(1)
    done = subprocess.run([sys.executable, "-X", "faulthandler", str(CHILD), mode, str(data_dir),
                           str(run_dir), str(out)], cwd=CHILD.parent.parent, env=env,
                          capture_output=True, text=True, timeout=scaled(900))
    assert done.returncode == 0, f"{mode}: exit code {done.returncode}\n{done.stderr[-8000:]}"
    result = json.loads(pathlib.Path(f"{out}.json").read_text())
    model = dict(np.load(f"{out}.npz")) if "stats" in result else {}
    return result, model


@pytest.mark.slow
def test_sigterm_mid_round_resumes_to_the_uninterrupted_result(tmp_path):
    names = ["mrdpo_1", "mrdpo_2"]
    data, whole, stopped = tmp_path / "data", tmp_path / "whole", tmp_path / "stopped"
    records, want = _arm("full", data, whole)
    assert list(records["stats"]) == names and records["stats"]["mrdpo_1"]["pairs"] > 0

    first, _ = _arm("stop", data, stopped)
    assert re.search(rf"\[mrdpo_2\] preempted .* step {STOP_AT[1]}", first.get("preempted", ""))
    assert (stopped / "stages" / "mrdpo_1" / "done").exists()
    assert not (stopped / "stages" / "mrdpo_2").exists()
    assert (stopped / "rounds" / "mrdpo" / "round_1" / "checkpoints" / str(STOP_AT[1])).is_dir()

    resumed, got = _arm("resume", data, stopped)
    logs = resumed["logs"]
    assert "[mrdpo_1] finished earlier: skipped" in " ".join(logs)
    assert [m for m in logs if m.startswith("[mrdpo_2] step")][0].startswith("[mrdpo_2] step 3/3")
    assert sorted(got) == sorted(want) and len(want) > 10
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert _stage_files(stopped, names) == _stage_files(whole, names)
    assert resumed["stats"] == records["stats"]


@pytest.mark.slow
def test_qa_option_scoring_is_batch_independent_and_reads_the_clip(demo_ctx):
    """QA answers = the option sentence with the highest summed log-probability (teacher forcing);
    the packed scores (one row per question, its options after one shared prompt) equal each option
    scored in its own row, do not depend on batching, and do depend on the clip's media."""
    from vsalmonn_jax.data.event_qa import event_qa_prompt
    from vsalmonn_jax.demo.caption import Captioner

    ctx, pre = demo_ctx
    split = ctx.data["test"]
    captioner = Captioner(ctx.task, ctx.tokens, pre)
    questions, predictions = captioner.answers(split, batch=8)
    assert questions and set(predictions) == {q["id"] for q in questions}
    rows, options = [], []
    for r, item in enumerate(split["items"]):
        for qa in item["qa"]:
            rows.append(r)
            options.append([ctx.tokens.response_row(o, event_qa_prompt(qa["question"], qa["options"]))
                            for o in qa["options"]])
    rows = np.asarray(rows)
    assert all(len(o) == 4 for o in options)
    packed = np.stack(captioner.option_logps(split["media"], rows, options, batch=8))     # [Q, 4]
    narrow = np.stack(captioner.option_logps(split["media"], rows, options, batch=3))
    np.testing.assert_allclose(narrow, packed, rtol=1e-5, atol=1e-4)
    one_each = captioner.response_logps(split["media"], np.repeat(rows, 4),
                                        [t for o in options for t in o], batch=8).reshape(-1, 4)
    np.testing.assert_allclose(packed, one_each, rtol=1e-5, atol=1e-4)   # fp32, other summation order
    assert [chr(65 + int(np.argmax(s))) for s in packed] == [predictions[q["id"]] for q in questions]
    shuffled = np.stack(captioner.option_logps(split["media"], (rows + 1) % len(split["items"]),
                                               options, batch=8))
    assert np.abs(shuffled - packed).max() > 1e-3
