"""Rebirth tuning: caption records from the final model, the non-caption mix ratio, and the stage end to
end on the tiny text policy (pre-DPO model SFT'd on the mrDPO model's captions, evaluated before and
after, resumable)."""

import jax
import numpy as np
import pytest
from mrdpo_helpers import config, fresh_state, items, setup, tokenizer

from vsalmonn_jax.training.pairs import Sample
from vsalmonn_jax.training.rebirth import caption_records, mix_records, run_rebirth

QA = [{"id": f"qa{i}", "conversations": [
    {"role": "user", "content": f"How many sounds are heard? {i}"},
    {"role": "assistant", "content": f"A. {i}"}]} for i in range(5)]


def test_caption_records_keep_media_collapse_repeats_and_skip_empty():
    videos = [{"id": "a", "video": "m/a.mp4", "prompt": "P?"}, {"id": "b"}, {"id": "c"}]
    captions = [Sample("At 0 s, a high beep sounds. " * 6, stopped=False), Sample("  "),
                Sample("At 1 s, the red circle appears.")]
    records, skipped = caption_records(videos, captions, "default")
    assert skipped == ["b"]
    assert records[0]["video"] == "m/a.mp4" and records[0]["id"] == "a:rebirth"
    assert records[0]["conversations"] == [
        {"role": "user", "content": "P?"},
        {"role": "assistant", "content": "At 0 s, a high beep sounds."}]
    assert records[1]["conversations"][0]["content"] == "default"
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        caption_records(videos[:2], captions[:1], "d")


@pytest.mark.parametrize("ratio,want", [(0.0, 0), (0.3, 4), (0.5, 10), (0.75, 30)])
def test_mix_ratio(ratio, want):
    caps = [{"id": f"c{i}", "conversations": []} for i in range(10)]
    mixed = mix_records(caps, QA, ratio, seed=1)
    extra = [r for r in mixed if r["id"].startswith("qa")]
    assert len(extra) == want and len(mixed) == 10 + want
    assert want == 0 or len(extra) / len(mixed) == pytest.approx(ratio, abs=0.03)
    if 0 < want <= len(QA):
        assert len({r["id"] for r in extra}) == want       # without replacement when possible
    assert mix_records(caps, QA, ratio, seed=1) == mixed  # seeded


def test_mix_errors_are_clear():
    with pytest.raises(ValueError, match="needs non-caption records"):
        mix_records([{"id": "c"}], [], 0.3, seed=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mix_records([{"id": "c"}], QA, 1.0, seed=0)


def test_rebirth_steps_come_from_its_records_under_train_epochs():
    """The 7B rebirth preset gives train.epochs=1 (the release): one pass over the rebirth mix
    (captions + non-caption records); rebirth.num_steps, when set, wins; epochs=0: train.num_steps."""
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.training.rebirth import rebirth_config

    cfg = load_config("tiny", ["train.epochs=1", "train.num_steps=1000", "rebirth.num_steps=0"])
    assert rebirth_config(cfg, records=130, rows_per_step=8).train.num_steps == 17   # ceil(130 / 8)
    cfg.train.epochs = 3
    assert rebirth_config(cfg, records=130, rows_per_step=8).train.num_steps == 49   # ceil(390 / 8)
    cfg.rebirth.num_steps = 5
    assert rebirth_config(cfg, records=130, rows_per_step=8).train.num_steps == 5
    cfg.rebirth.num_steps, cfg.train.epochs = 0, 0
    assert rebirth_config(cfg, records=130, rows_per_step=8).train.num_steps == 1000
    assert load_config("7b_rebirth").train.epochs == 1


@pytest.mark.slow
def test_rebirth_trains_the_pre_dpo_model_on_final_captions(tmp_path):
    tok = tokenizer(str(tmp_path / "tok"))
    cfg = config("rebirth.num_steps=3", "rebirth.non_caption_ratio=0.5", "stage=rebirth")
    env, mesh, pre = setup(cfg, tok)
    final = fresh_state(env, cfg, mesh, seed=1)
    pre_lora = jax.tree.map(np.asarray, jax.device_get(pre.trainable["lora"]))
    evals = []

    def eval_fn(s):
        evals.append(1)
        flat = jax.tree.leaves(jax.device_get(s.trainable["lora"]))
        return {"lora_b_norm": float(sum(np.abs(np.asarray(x)).sum() for x in flat))}

    state, summary = run_rebirth(cfg, env, tmp_path / "rebirth", pre_dpo_state=pre,
                                 final_state=final, train_items=items(4), non_caption_records=QA,
                                 eval_fn=eval_fn, mesh=mesh)
    assert summary["captions"] + len(summary["skipped_empty"]) == 4
    assert summary["records"] == summary["captions"] + round(summary["captions"])
    assert int(state.step) == 3 and not summary["preempted"]
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         jax.device_get(state.trainable["lora"]), pre_lora)
    assert max(jax.tree.leaves(moved)) > 0
    assert summary["after"]["lora_b_norm"] != summary["before"]["lora_b_norm"]
    assert (tmp_path / "rebirth" / "captions.json").is_file()
    # a second call resumes: nothing is captioned, trained or evaluated again
    again, summary2 = run_rebirth(cfg, env, tmp_path / "rebirth",
                                  pre_dpo_state=fresh_state(env, cfg, mesh),
                                  final_state=None, train_items=items(4), non_caption_records=QA,
                                  eval_fn=eval_fn, mesh=mesh)
    assert len(evals) == 2 and summary2["after"] == summary["after"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.trainable),
                 jax.device_get(state.trainable))
