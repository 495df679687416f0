"""mrDPO round loop end to end on the tiny text policy: every round starts at DPO loss log 2, the
round artefacts are written, and a run killed mid-round resumes to the same trainables and metrics."""

import json
import math

import jax
import numpy as np
import pytest
from mrdpo_helpers import LengthJudge, config, fresh_state, items, setup, tokenizer

from vsalmonn_jax.training.mrdpo import load_round_state, run_mrdpo

# ~50 s of CPU (three compiles: DPO step, top-p and greedy generation); the tests share one run
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mrdpo_resume")]


def _policy_logits(env, state):
    ids = np.random.default_rng(0).integers(3, 400, size=(2, 10)).astype(np.int32)
    variables = {"params": state.params, "lora": state.trainable["lora"]}
    return np.asarray(env.task.model.apply(variables, ids)[0])


class Killed(RuntimeError):
    pass


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer(str(tmp_path_factory.mktemp("tok")))


def _run(tmp, tok, env_mesh=None, kill_at=None):
    cfg = config()
    env, mesh, _ = env_mesh
    state = fresh_state(env, cfg, mesh, trained_lora=True)   # an SFT LoRA: merged before round 0

    def on_step(r, step, metrics):
        if kill_at == (r, step):
            raise Killed(f"killed at round {r} step {step}")

    return run_mrdpo(cfg, env, tmp, state=state, train_items=items(6), eval_items=items(4, 100),
                     mesh=mesh, judge=LengthJudge(), on_step=on_step)


@pytest.fixture(scope="module")
def env_mesh(tok):
    return setup(config(), tok)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tok, env_mesh):
    tmp = tmp_path_factory.mktemp("full")
    state, summary = _run(tmp, tok, env_mesh)
    return tmp, _host({"params": state.params, "trainable": state.trainable}), summary


def test_every_round_starts_at_log2_and_writes_its_artefacts(uninterrupted):
    tmp, _, summary = uninterrupted
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1]
    for h in history:
        # round start: fresh LoRA (B = 0) on the merged base, reference = the same network
        assert h["first_step"]["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
        assert h["first_step"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert h["pairs"]["pairs"] > 0 and h["pairs"]["samples"] == 12
        assert set(h["eval"]) >= {"miss", "incorrect", "hallucination", "total", "seq_rep_4"}
        assert len(h["eval"]["captions"]) == 4
    # the round actually trained: its last step moved away from the reference
    assert history[0]["last_step"]["dpo_loss"] != pytest.approx(math.log(2.0), abs=1e-4)
    pairs = [json.loads(line) for line in open(tmp / "round_0" / "pairs.jsonl")]
    assert all({"prompt", "chosen", "rejected", "gt"} <= set(p) for p in pairs)
    # dpo.precompute_reference (the mrDPO default): one reference row per pair, stored beside them
    reference = [json.loads(line) for line in open(tmp / "round_0" / "reference.jsonl")]
    assert [r["id"] for r in reference] == [p["id"] for p in pairs]
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in reference)
    assert all(p["chosen_error"] < p["rejected_error"] for p in pairs)
    assert len(open(tmp / "round_1" / "samples.jsonl").readlines()) == 12
    assert json.loads((tmp / "mrdpo.json").read_text())["round"] == 2


def test_killed_mid_round_resumes_to_the_same_result(tmp_path, tok, env_mesh, uninterrupted):
    _, want, want_summary = uninterrupted
    with pytest.raises(Killed):   # round 1, step 3: after the step-2 checkpoint, before the end
        _run(tmp_path, tok, env_mesh, kill_at=(1, 3))
    assert (tmp_path / "round_1" / "checkpoints" / "2").is_dir()
    stored = tmp_path / "round_1" / "reference.jsonl"   # written once with the round's pairs
    before = (stored.stat().st_ino, stored.stat().st_mtime_ns, stored.read_text())
    state, summary = _run(tmp_path, tok, env_mesh)
    assert summary["resumed_round"] == 1
    # the resumed round read its reference log-probs back: the file was not rewritten
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns, stored.read_text()) == before
    got = _host({"params": state.params, "trainable": state.trainable})
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert summary["history"] == want_summary["history"]


def test_round_zero_state_is_the_pre_dpo_model(uninterrupted, tok, env_mesh):
    tmp, _, _ = uninterrupted
    env, mesh, _ = env_mesh
    sft = fresh_state(env, config(), mesh, trained_lora=True)
    sft_logits = _policy_logits(env, sft)
    want = _host(fresh_state(env, config(), mesh).params)
    restored, meta = load_round_state(tmp, 0, fresh_state(env, config(), mesh))
    assert meta == {"round": 0, "history": []}
    # round 0 = the SFT policy with its LoRA folded into the base (B = 0): same logits
    np.testing.assert_allclose(_policy_logits(env, restored), sft_logits, atol=1e-5, rtol=0)
    assert not any(np.asarray(leaf).any() for path, leaf in jax.tree_util.tree_flatten_with_path(
        _host(restored.trainable["lora"]))[0] if path[-1].key == "b")
    final, meta = load_round_state(tmp, 2, fresh_state(env, config(), mesh))
    assert meta["round"] == 2
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), final.params, want)
    assert max(jax.tree.leaves(diff)) > 0   # the merges changed the base


def test_sigterm_mid_round_saves_and_resumes(tmp_path, tok, env_mesh, uninterrupted):
    import signal

    _, want, want_summary = uninterrupted
    cfg = config()
    env, mesh, _ = env_mesh

    def on_step(r, step, metrics):
        if (r, step) == (0, 1):
            signal.raise_signal(signal.SIGTERM)   # to this (main) thread; the loop saves after the step

    state, summary = run_mrdpo(cfg, env, tmp_path, state=fresh_state(env, cfg, mesh,
                                                                      trained_lora=True),
                               train_items=items(6), eval_items=items(4, 100), mesh=mesh,
                               judge=LengthJudge(), on_step=on_step)
    assert summary["preempted"] and summary["round"] == 0 and summary["step"] == 1
    assert (tmp_path / "round_0" / "checkpoints" / "1").is_dir()
    state, summary = _run(tmp_path, tok, env_mesh)
    assert summary["resumed_round"] == 0 and not summary["preempted"]
    got = _host({"params": state.params, "trainable": state.trainable})
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert summary["history"] == want_summary["history"]


def test_control_arm_trains_on_gt_captions_only(tmp_path, tok, env_mesh):
    cfg = config("mrdpo.control=True", "mrdpo.rounds=1")
    env, mesh, _ = env_mesh
    _, summary = run_mrdpo(cfg, env, tmp_path, state=fresh_state(env, cfg, mesh, trained_lora=True),
                           train_items=items(6), mesh=mesh, judge=LengthJudge())
    (round0,) = summary["history"]
    assert "dpo_loss" not in round0["first_step"] and round0["first_step"]["ce"] > 0
    assert round0["pairs"]["control_records"] == 6 and round0["pairs"]["samples"] == 12
    records = [json.loads(line) for line in open(tmp_path / "round_0" / "pairs.jsonl")]
    truth = {v["id"]: v["caption"] for v in items(6)}
    assert [r["conversations"][1]["content"] for r in records] == [
        truth[r["id"].split(":")[0]] for r in records]
    assert round0["eval"] == {}


def test_a_round_on_free_text_events_with_the_embedding_judge(tmp_path, tok, env_mesh):
    """The official test set's form of ground truth (events as plain sentences) through a whole
    round: samples judged by the packaged embedding judge, pairs / CE records written, the round's
    evaluation scored against the free-text events."""
    cfg = config("mrdpo.rounds=1", "mrdpo.judge=embedding", "mrdpo.ce_only_records=True")
    env, mesh, _ = env_mesh
    free = [dict(item, events=[s.strip() + "." for s in item["caption"].split(".") if s.strip()])
            for item in items(6)]
    assert all(isinstance(e, str) for item in free for e in item["events"])
    _, summary = run_mrdpo(cfg, env, tmp_path, state=fresh_state(env, cfg, mesh),
                           train_items=free, eval_items=free[:2], mesh=mesh)
    (round0,) = summary["history"]
    assert round0["pairs"]["samples"] == 12
    records = [json.loads(line) for line in open(tmp_path / "round_0" / "pairs.jsonl")]
    assert records and {r["id"].split(":")[0] for r in records} <= {item["id"] for item in free}
    assert 0.0 <= round0["eval"]["miss"] <= 1.0
