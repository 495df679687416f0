"""Tests for training/loop.py + checkpoint.py: SFT overfits, DPO learns toy pairs, exact resume
after SIGTERM and after a crash, NaN batches stop (naming step, ids, checkpoint) or are skipped.
"""

import json
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_tasks import host, mesh_of, tiny_config

from vsalmonn_jax.training import synthetic
from vsalmonn_jax.training.loop import NonFiniteLossError, run_stage
from vsalmonn_jax.training.task import build_task

QUIET = dict(progress=False, tensorboard=False)


def _sharp_params(task, scale=25.0):
    """A random base whose lm_head is sharp enough to be fitted through LoRA alone (a stand-in for
    a pretrained model: at init scale 0.02 the logits cannot exceed ~1.3 whatever LoRA does)."""
    params = nn.unbox(task.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * scale
    return params


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_overfits_four_samples(tmp_path):
    config = tiny_config("stage=sft", "train.lr=1e-2", "train.num_steps=50", "train.log_every=5",
                         "train.checkpoint_every=1000", "train.eval_every=25")
    task = build_task(config, text_only=True)
    data = synthetic.sft_examples(4, 512, 12, seed=0)
    it = synthetic.ArrayIterator(data, 4, seed=0)
    from vsalmonn_jax.training.loop import evaluate

    eval_fn = lambda state, steps: evaluate(steps, state, [data])
    state, summary = run_stage(config, it, tmp_path, task=task, params=_sharp_params(task),
                               mesh=mesh_of(4), eval_fn=eval_fn, **QUIET)
    assert summary["step"] == 50 and summary["last"]["loss"] < 0.05
    records = _records(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(5, 51, 5))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "target_tokens"} <= set(train[0])
    assert train[0]["loss"] > 1.0 and evals[-1]["loss"] < 0.05 and evals[-1]["perplexity"] < 1.06


def test_dpo_toy_pairs_reach_full_accuracy(tmp_path):
    config = tiny_config("stage=dpo", "train.lr=1e-2", "train.num_steps=12", "train.log_every=1",
                         "train.checkpoint_every=1000", "dpo.gt_ce_weight=0.1")
    it = synthetic.ArrayIterator(synthetic.dpo_examples(8, 512, 12, seed=3), 8, seed=0)
    task, mesh = build_task(config, text_only=True), mesh_of(8, data=2, fsdp=2, tensor=2)
    state, summary = run_stage(config, it, tmp_path, task=task, mesh=mesh, **QUIET)
    train = [r for r in _records(tmp_path) if r["split"] == "train"]
    assert train[0]["dpo_loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    assert train[-1]["rewards/accuracy"] == 1.0
    assert train[-1]["rewards/margins"] > train[3]["rewards/margins"] > 0
    assert train[-1]["dpo_loss"] < train[0]["dpo_loss"] - 0.05
    assert "gt_ce" in train[-1] and summary["checkpoint"].endswith("/12")
    # evaluation over 11 pairs in batches of 8 and 3 (padded to 8): the pair metrics are means over
    # the 11 pairs (a mean of the two batch means weighed the short batch as a full one)
    from vsalmonn_jax.training.loop import compiled_steps, evaluate

    steps = compiled_steps(task, config, 12, mesh)[2]                  # run_stage's own
    data = synthetic.dpo_examples(11, 512, 12, seed=9)
    rows = lambda index: {k: v[index] for k, v in data.items()}  # noqa: E731
    got = evaluate(steps, state, [rows(slice(0, 8)), rows(slice(8, 11))])
    alone = [evaluate(steps, state, [rows(slice(i, i + 1))]) for i in range(11)]
    assert got["pairs"] == 11.0
    for key in ("dpo_loss", "rewards/accuracy", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(np.mean([a[key] for a in alone]), rel=1e-5, abs=1e-6), key


def _resume_config():
    return tiny_config("stage=sft", "train.num_steps=6", "train.grad_accum=2",
                       "model.lora.dropout=0.1", "train.checkpoint_every=2")


_RESUME_TASK = build_task(_resume_config(), text_only=True)  # one task: the step compiles once


def _resume_run(workdir, on_step=None):
    it = synthetic.ArrayIterator(synthetic.sft_examples(8, 512, 12, seed=1), 4, seed=5)
    return run_stage(_resume_config(), it, workdir, task=_RESUME_TASK, mesh=mesh_of(4),
                     on_step=on_step, **QUIET)


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
    full, summary = _resume_run(tmp_path / "full")
    assert summary["step"] == 6 and not summary["preempted"]
    # killed after the last step's save (e.g. before mrDPO saved the next round's start): a restart
    # runs no step, and reports the last step's metrics as the run had them (it reported {})
    _, again = _resume_run(tmp_path / "full")
    assert again["resumed_from"] == 6 and again["last"] == summary["last"] and summary["last"]

    def sigterm_at_3(step, _):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    part, summary = _resume_run(tmp_path / "term", on_step=sigterm_at_3)
    assert summary["preempted"] and summary["step"] == 3 and summary["checkpoint"].endswith("/3")
    resumed, summary = _resume_run(tmp_path / "term")
    assert summary["resumed_from"] == 3 and summary["step"] == 6

    def crash_at_5(step, _):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(tmp_path / "crash", on_step=crash_at_5)
    crashed, summary = _resume_run(tmp_path / "crash")
    assert summary["resumed_from"] == 4 and summary["step"] == 6

    ref = host({"t": full.trainable, "o": full.opt_state, "s": full.step})
    for other in (resumed, crashed):
        got = host({"t": other.trainable, "o": other.opt_state, "s": other.step})
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(ref["t"]["lora"]))


class _Poison:
    """Wraps an iterator: the `at`-th batch (1-based) gets a NaN precomputed reference log-prob."""

    def __init__(self, it, at):
        self.it, self.at, self.count = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.it))
        self.count += 1
        n = len(batch["example_id"])
        batch["ref_chosen_logps"] = np.full(n, -30.0, np.float32)
        batch["ref_rejected_logps"] = np.full(n, -30.0, np.float32)
        if self.count == self.at:
            batch["ref_chosen_logps"][1] = np.nan
        return batch


_NAN_TASK = build_task(tiny_config(), text_only=True)


def _nan_run(workdir, on_nan):
    config = tiny_config("stage=dpo", "train.num_steps=4", "train.checkpoint_every=2",
                         f"train.on_nan={on_nan}")
    data = synthetic.dpo_examples(8, 512, 12, seed=2)
    data["example_id"] = np.arange(100, 108)
    it = _Poison(synthetic.ArrayIterator(data, 4, seed=0, shuffle=False), at=3)
    return run_stage(config, it, workdir, task=_NAN_TASK, mesh=mesh_of(4), **QUIET)


def test_nan_batch_stops_with_step_ids_and_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        _nan_run(tmp_path, "stop")
    text = str(err.value)
    assert "at step 3" in text and "example_ids=[100, 101, 102, 103]" in text
    assert str(tmp_path / "checkpoints" / "2") in text and "on_nan=skip" in text


def test_nan_batch_is_skipped_and_counted(tmp_path):
    state, summary = _nan_run(tmp_path, "skip")
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(state.trainable)))
    records = _records(tmp_path)
    assert any(r.get("skipped_nonfinite") == 1.0 and r["step"] == 3 for r in records)
    assert records[-1]["skipped_steps"] == 1.0
