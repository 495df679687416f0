"""The text PolicyEnv and the round's data plumbing: batch-independent sampling, checkpointable batch
iterators, fresh slices per round; per-round reference log-probs equal to the in-step reference,
stored, reused without recompute and checked against the pairs."""

import json

import jax
import numpy as np
import pytest
from mrdpo_helpers import config, fresh_state, items, setup, tokenizer

from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.training import round_reference as round_reference_lib
from vsalmonn_jax.training.loop import compiled_steps, device_batch, prepare_state
from vsalmonn_jax.training.mrdpo import round_items
from vsalmonn_jax.training.policy_env import ListIterator, TextPolicyEnv
from vsalmonn_jax.training.round_reference import REFERENCE_FIELDS, REFERENCE_FILE, round_reference


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


def test_list_iterator_stopped_while_collating_keeps_that_batch():
    """A stop signal raised inside the collate (the AV one builds the pixel arrays) leaves the
    position at that batch: the saved state resumes with it (it was skipped before)."""
    from vsalmonn_jax.training.interrupts import Interrupted

    examples = [{"x": np.int64(i)} for i in range(5)]
    calls = []

    def collate(rows):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted("SIGTERM")
        return {"x": np.asarray([r["x"] for r in rows])}

    it = ListIterator(examples, collate, 2, seed=1, shuffle=True, repeat=True)
    whole = ListIterator(examples, lambda rows: {"x": np.asarray([r["x"] for r in rows])}, 2, seed=1,
                         shuffle=True, repeat=True)
    expected = [next(whole)["x"].tolist() for _ in range(5)]   # crosses an epoch boundary
    got = [next(it)["x"].tolist() for _ in range(2)]
    with pytest.raises(Interrupted):
        next(it)
    resumed = ListIterator(examples, collate, 2, seed=1, shuffle=True, repeat=True)
    resumed.set_state(it.get_state())
    assert got + [next(resumed)["x"].tolist() for _ in range(3)] == expected


def test_round_items_take_fresh_slices():
    videos = [{"id": i} for i in range(5)]
    assert round_items(videos, 0, 0) == videos
    assert [v["id"] for v in round_items(videos, 0, 2)] == [0, 1]
    assert [v["id"] for v in round_items(videos, 1, 2)] == [2, 3]
    assert [v["id"] for v in round_items(videos, 2, 2)] == [4, 0]   # cycles


def _pair_records(count: int) -> list[dict]:
    records = [{"id": f"{v['id']}:0>1", "prompt": v["prompt"], "chosen": v["caption"],
                "rejected": "At 1 s, a low beep sounds.", "gt": v["caption"]} for v in items(count)]
    return records + [{"id": "v9:gt", "prompt": "Describe.", "gt": "At 0 s, the red circle appears."}]


def test_round_reference_equals_the_in_step_reference(text_env, tmp_path):
    cfg, env, mesh, _, _ = text_env
    state = fresh_state(env, cfg, mesh, trained_lora=True)   # policy (LoRA on) != reference (off)
    records = _pair_records(3)                                # 3 pairs + 1 CE-only record
    path = tmp_path / REFERENCE_FILE
    # batches of 2 over data = 2: the second one is padded (row 2 repeated)
    with_ref = round_reference(env, cfg, state, records, mesh, path, batch_size=2, num_steps=4)
    assert [json.loads(line)["index"] for line in open(path)] == [0, 1, 2]
    assert "ref_chosen_logps" not in records[0]
    assert with_ref[3]["ref_chosen_logps"] == with_ref[3]["ref_rejected_logps"] == 0.0  # CE-only
    tx, _, steps, _, _ = compiled_steps(env.task, cfg, 4, mesh)
    run_state, _ = prepare_state(env.task, cfg, tx, mesh, state=state)
    batch = next(env.batches(records[:3], batch_size=4, seed=0, shuffle=False, repeat=False))
    direct = jax.device_get(steps.reference(run_state, device_batch(batch, steps)))
    for field in REFERENCE_FIELDS:   # each row where it belongs (other batching, no padding mix-up)
        np.testing.assert_allclose([r[field] for r in with_ref[:3]], direct[field][:3], atol=1e-5,
                                   rtol=0)
    metrics = []
    for precomputed, recs in ((False, records[:3]), (True, with_ref[:3])):
        batch = next(env.batches(recs, batch_size=4, seed=0, shuffle=False, repeat=False))
        assert ("ref_chosen_logps" in batch) == precomputed
        metrics.append(jax.device_get(steps.eval(run_state, device_batch(batch, steps))))
    assert abs(float(metrics[0]["rewards/chosen"])) > 1e-3   # the policy is not the reference
    for key in ("loss", "dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(metrics[0][key]) == pytest.approx(float(metrics[1][key]), abs=1e-5), key


def test_stored_reference_is_reused_and_checked(text_env, tmp_path, monkeypatch):
    cfg, env, mesh, state, _ = text_env
    records = _pair_records(2)
    path = tmp_path / REFERENCE_FILE
    first = round_reference(env, cfg, state, records, mesh, path, batch_size=2, num_steps=4)
    text = path.read_text()

    def no_compute(*args, **kwargs):
        raise AssertionError("the stored reference was recomputed")

    monkeypatch.setattr(round_reference_lib, "compute_reference", no_compute)
    assert round_reference(env, cfg, state, records, mesh, path, batch_size=2,
                           num_steps=4) == first
    assert path.read_text() == text
    rows = [json.loads(line) for line in text.splitlines()]
    bad = [dict(rows[0]), dict(rows[1], id="v7:0>1")]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match=f"{path}:2: .*does not match pair record"):
        round_reference(env, cfg, state, records, mesh, path, batch_size=2, num_steps=4)
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: 1 reference rows for 2 pair records"):
        round_reference(env, cfg, state, records, mesh, path, batch_size=2, num_steps=4)


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


def test_a_reference_batch_one_process_cannot_build_stops_the_others(text_env, monkeypatch):
    """Each process builds only its rows of the reference pass: an error there (a clip it cannot
    decode) raised on that process alone while the others waited in the batch's collectives."""
    from vsalmonn_jax.training import host_batches

    cfg, env, mesh, state, _ = text_env
    tx, _, steps, _, _ = compiled_steps(env.task, cfg, 4, mesh)

    def batches():
        yield from []
        raise OSError("clip3.mp4: gone")

    told = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(host_batches, "report_failure", lambda mesh, **kw: told.append(mesh))
    with pytest.raises(OSError, match="gone"):
        round_reference_lib.batch_reference(steps, state, batches(), 3, 2)
    assert told == [steps.mesh]
