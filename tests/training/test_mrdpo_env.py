"""The text PolicyEnv and the round's data plumbing: batch-independent sampling, checkpointable batch
iterators, fresh slices per round, precomputed reference log-probs equal to the in-step reference."""

import jax
import numpy as np
import pytest
from mrdpo_helpers import config, items, setup, tokenizer

from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training import steps as sp
from vsalmonn_jax.training.loop import device_batch, prepare_state
from vsalmonn_jax.training.mrdpo import precompute_reference, round_items
from vsalmonn_jax.training.policy_env import ListIterator, TextPolicyEnv


@pytest.fixture(scope="module")
def text_env(tmp_path_factory):
    tok = tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = config()
    env, mesh, state = setup(cfg, tok)
    return cfg, env, mesh, state, tok


def test_sampling_does_not_depend_on_batching(text_env):
    cfg, env, mesh, state, tok = text_env
    videos = items(5)
    sampling = SamplingConfig(greedy=False, top_p=0.9)
    rng = jax.random.PRNGKey(3)
    wide = env.generate(state, videos, sampling=sampling, rng=rng, max_new_tokens=6)
    narrow = TextPolicyEnv(env.task, tok, sample_batch=2).generate(
        state, videos, sampling=sampling, rng=rng, max_new_tokens=6)
    assert [s.text for s in wide] == [s.text for s in narrow]
    assert [s.logprob for s in wide] == pytest.approx([s.logprob for s in narrow], abs=1e-4)
    assert all(0 < s.num_tokens <= 6 for s in wide)
    other = env.generate(state, videos, sampling=sampling, rng=jax.random.PRNGKey(4),
                         max_new_tokens=6)
    assert [s.text for s in other] != [s.text for s in wide]


def test_list_iterator_resumes_pads_and_covers():
    examples = [{"x": np.int64(i)} for i in range(5)]
    collate = lambda rows: {"x": np.asarray([r["x"] for r in rows])}  # noqa: E731
    it = ListIterator(examples, collate, 2, seed=1, shuffle=True, repeat=True)
    first = [next(it)["x"].tolist() for _ in range(3)]
    state = it.get_state()
    rest = [next(it)["x"].tolist() for _ in range(4)]
    again = ListIterator(examples, collate, 2, seed=1, shuffle=True, repeat=True)
    again.set_state(state)
    assert [next(again)["x"].tolist() for _ in range(4)] == rest
    assert all(len(b) == 2 for b in first + rest)
    one_pass = list(ListIterator(examples, collate, 2, seed=0, shuffle=False, repeat=False))
    assert [b["x"].tolist() for b in one_pass] == [[0, 1], [2, 3], [4, 4]]   # tail padded
    with pytest.raises(ValueError, match="no records"):
        ListIterator([], collate, 2, 0, True, True)


def test_round_items_take_fresh_slices():
    videos = [{"id": i} for i in range(5)]
    assert round_items(videos, 0, 0) == videos
    assert [v["id"] for v in round_items(videos, 0, 2)] == [0, 1]
    assert [v["id"] for v in round_items(videos, 1, 2)] == [2, 3]
    assert [v["id"] for v in round_items(videos, 2, 2)] == [4, 0]   # cycles


def test_precomputed_reference_matches_the_in_step_reference(text_env):
    cfg, env, mesh, state, _ = text_env
    records = [{"prompt": v["prompt"], "chosen": v["caption"], "rejected": "At 1 s, a low beep "
                "sounds.", "gt": v["caption"]} for v in items(4)]
    records.append({"prompt": "Describe.", "gt": "At 0 s, the red circle appears."})  # CE-only
    with_ref = precompute_reference(env, cfg, state, records, mesh, batch_size=2)
    assert "ref_chosen_logps" not in with_ref[-1] and "ref_chosen_logps" not in records[0]
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in with_ref[:4])
    tx, schedule = st.make_optimizer(cfg.train, 4)
    _, shardings = st.state_shardings(env.task, cfg, tx, mesh)
    steps = sp.make_steps(env.task, cfg, tx, schedule, mesh, shardings)
    run_state, _ = prepare_state(env.task, cfg, tx, mesh, state=state)
    metrics = []
    for precomputed, recs in ((False, records[:4]), (True, with_ref[:4])):
        batch = next(env.batches(recs, batch_size=4, seed=0, shuffle=False, repeat=False))
        assert ("ref_chosen_logps" in batch) == precomputed
        metrics.append(jax.device_get(steps.eval(run_state, device_batch(batch, steps))))
    for key in ("loss", "dpo_loss", "rewards/margins", "logps/chosen"):
        assert float(metrics[0][key]) == pytest.approx(float(metrics[1][key]), abs=1e-5)
    # policy = reference at init; packed, the policy row holds the GT answer and the reference's
    # does not, so the two forwards differ in shape and round differently (~1e-6 in fp32)
    assert float(metrics[0]["dpo_loss"]) == pytest.approx(np.log(2.0), abs=1e-5)


def test_local_rows_slice_each_batch_and_pass_state_through():
    from vsalmonn_jax.training.policy_env import LocalRows

    examples = [{"x": np.int64(i)} for i in range(8)]
    collate = lambda rows: {"x": np.asarray([r["x"] for r in rows])}  # noqa: E731
    base = ListIterator(examples, collate, 4, seed=0, shuffle=False, repeat=True)
    view = LocalRows(base, 2, 4)
    assert next(view)["x"].tolist() == [2, 3]
    assert view.get_state() == {"epoch": 0, "position": 4}
    view.set_state({"epoch": 0, "position": 0})
    assert next(view)["x"].tolist() == [2, 3]
