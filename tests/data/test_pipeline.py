"""The grain loader: batch contract, seeded order, host shards, quarantine, resumable state, cache."""

import json
import shutil

import numpy as np
import pytest

from vsalmonn_jax.config import load_config
from vsalmonn_jax.data import example as example_lib
from vsalmonn_jax.data.features import siglip_pixels
from vsalmonn_jax.data.media import load_media
from vsalmonn_jax.data.pipeline import make_loader
from vsalmonn_jax.data.quarantine import TooManyFailures
from vsalmonn_jax.data.records import load_records


def _config(synth_dir, tmp_path, *overrides):
    return load_config("tiny", [f"data.tokenizer={synth_dir / 'tokenizer'}", f"workdir={tmp_path}",
                                "data.batch_size=4", *overrides])


def _ids(loader):
    out = [b["example_id"].tolist() for b in loader]
    loader.close()
    return out


def test_batch_contract(synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path)
    records = load_records(str(synth_dir / "sft_train.jsonl"))
    batch = next(make_loader(records, config, shard=(0, 1)))
    b, t = batch["input_ids"].shape
    assert b == 4 and t >= 16 and (t & (t - 1)) == 0
    assert batch["input_ids"].dtype == np.int32 and batch["example_id"].dtype == np.int64
    for name in ("attention_mask", "loss_mask", "frame_mask", "mel_mask", "has_video", "has_audio"):
        assert batch[name].dtype == bool, name
    lengths = batch["attention_mask"].sum(1)
    for row in range(b):                                          # right padding
        assert batch["attention_mask"][row, :lengths[row]].all()
        assert not batch["attention_mask"][row, lengths[row]:].any()
        assert (batch["input_ids"][row, lengths[row]:] == 0).all()
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    assert ((batch["input_ids"] == 3) & batch["attention_mask"]).sum(1).tolist() == [1] * b
    assert batch["pixel_values"].shape == (b, 8, 56, 56, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["mel"].shape == (b, 1, 16, 3000) and batch["mel_mask"].all()
    assert batch["has_video"].all() and batch["has_audio"].all()
    for row, index in enumerate(batch["example_id"]):
        record = records[int(index)]
        assert record["index"] == index
        media = load_media(record["video"])
        frames = media.frames.shape[0]
        assert batch["frame_mask"][row].sum() == frames
        np.testing.assert_allclose(batch["frame_times"][row, :frames], np.arange(frames))
        np.testing.assert_allclose(batch["pixel_values"][row, :frames],
                                   siglip_pixels(media.frames, 56), atol=1e-6)
        assert batch["audio_seconds"][row] == pytest.approx(media.audio_seconds, abs=1e-4)


def test_order_is_deterministic_per_seed_and_reshuffled_per_epoch(synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.batch_size=6", f"data.encoder_cache={tmp_path}/c")
    records = load_records(str(synth_dir / "sft_train.jsonl"))[:12]
    first = _ids(make_loader(records, config, shard=(0, 1), num_epochs=2))
    again = _ids(make_loader(records, config, shard=(0, 1), num_epochs=2))
    other = _ids(make_loader(records, config, shard=(0, 1), num_epochs=2, seed=99))
    assert first == again and first != other
    epoch1, epoch2 = sum(first[:2], []), sum(first[2:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(12)) and epoch1 != epoch2


def test_host_shards_partition_the_records(synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.batch_size=5")
    records = load_records(str(synth_dir / "sft_train.jsonl"))[:10]
    shard0 = sum(_ids(make_loader(records, config, shard=(0, 2))), [])
    shard1 = sum(_ids(make_loader(records, config, shard=(1, 2))), [])
    assert len(shard0) == len(shard1) == 5 and sorted(shard0 + shard1) == list(range(10))


@pytest.fixture
def mixed_records(media_dir, synth_dir, tmp_path):
    """Three good clips, each kind of broken file and a video without audio, in one data root."""
    root = tmp_path / "root"
    root.mkdir()
    names = ["truncated.mp4", "truncated_faststart.mp4", "zero.mp4", "text.mp4", "fps1_200s.mp4"]
    for name in names:
        shutil.copy(media_dir / name, root / name)
    good = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()[:3]]
    rows = []
    for i, row in enumerate(good):
        shutil.copy(synth_dir / row["video"], root / f"good{i}.mp4")
        rows.append({"id": f"good{i}", "video": f"good{i}.mp4", "events": row["events"]})
    rows[1:1] = [{"id": n, "video": n, "events": []} for n in names + ["missing.mp4"]]
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(str(path))


def test_quarantine_records_failures_and_keeps_going(mixed_records, synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.max_failure_share=0.9")
    loader = make_loader(mixed_records, config, shard=(0, 1), shuffle=False)
    batches = list(loader)
    kept = [int(i) for b in batches for i in b["example_id"]]
    by_id = {r["index"]: r["id"] for r in mixed_records}
    assert [by_id[i] for i in kept] == ["good0", "fps1_200s.mp4", "good1", "good2"]
    silent = [b for b in batches if not b["has_audio"].all()][0]
    row = int(np.flatnonzero(~silent["has_audio"])[0])
    assert silent["frame_mask"][row].sum() == 110 and silent["audio_seconds"][row] == 200
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert {x["id"]: x["reason"] for x in lines} == {
        "truncated.mp4": "undecodable", "truncated_faststart.mp4": "truncated", "zero.mp4": "empty",
        "text.mp4": "undecodable", "missing.mp4": "missing"}
    assert all(x["source"].endswith("records.jsonl") and x["line"] >= 2 for x in lines)
    assert loader.summary().startswith("data: 9 records, 5 quarantined")


def test_missing_audio_error_mode_quarantines(mixed_records, synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.max_failure_share=0.9", "data.missing_audio=error")
    list(make_loader(mixed_records, config, shard=(0, 1), shuffle=False))
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert {"id": "fps1_200s.mp4", "reason": "no_audio"}.items() <= \
        next(x for x in lines if x["id"] == "fps1_200s.mp4").items()


def test_too_many_failures_stop_with_a_clear_message(mixed_records, synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.max_failure_share=0.3")
    with pytest.raises(TooManyFailures, match=r"5 of 9 records failed \(55.6% > data.max_failure_share"):
        list(make_loader(mixed_records, config, shard=(0, 1), shuffle=False))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_restoring_iterator_state_gives_the_same_next_batch(synth_dir, tmp_path):
    import orbax.checkpoint as ocp

    config = _config(synth_dir, tmp_path, "data.batch_size=3")
    records = load_records(str(synth_dir / "sft_train.jsonl"))[:15]
    loader = make_loader(records, config, shard=(0, 1), num_epochs=2)
    for _ in range(3):
        next(loader)
    state = loader.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(state)))
        manager.wait_until_finished()
        restored = manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    expected = [next(loader) for _ in range(4)]                  # crosses the epoch boundary
    fresh = make_loader(records, config, shard=(0, 1), num_epochs=2)
    fresh.set_state(json.loads(json.dumps(restored)))
    for want in expected:
        _assert_same(next(fresh), want)
    assert fresh.batches == 7


def test_media_cache_skips_decoding(synth_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    config = _config(synth_dir, tmp_path, f"data.encoder_cache={cache}")
    records = load_records(str(synth_dir / "train.jsonl"))[:4]
    first = next(make_loader(records, config, shard=(0, 1), shuffle=False))
    assert len(list(cache.glob("*/*.npz"))) == 4

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(example_lib, "load_media", fail)
    _assert_same(next(make_loader(records, config, shard=(0, 1), shuffle=False)), first)


def test_preference_and_prompt_only_batches(synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path)
    video = str(synth_dir / "media/train/train_000000.mp4")
    rows = [{"video": video, "prompt": "Please describe the video in detail.",
             "chosen": "At 0 s, the red circle appears.", "rejected": "At 1 s, a low beep sounds.",
             "gt": "At 0 s, the red circle appears. At 2 s, a noise burst sounds.",
             "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
            {"video": video, "prompt": "Please describe the video in detail.", "gt": "At 0 s, x.",
             "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}]
    path = synth_dir / "pref_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = next(make_loader(load_records(str(path)), config, shard=(0, 1), shuffle=False))
    t = batch["chosen_input_ids"].shape[1]
    for prefix in ("chosen_", "rejected_", "gt_"):
        assert batch[f"{prefix}input_ids"].shape == (2, t)
        assert not (batch[f"{prefix}loss_mask"] & ~batch[f"{prefix}attention_mask"]).any()
    assert batch["has_pair"].tolist() == [True, False]
    assert not batch["chosen_attention_mask"][1].any() and batch["gt_loss_mask"][1].any()
    np.testing.assert_allclose(batch["ref_chosen_logps"], [-3.0, 0.0])
    assert "input_ids" not in batch

    caption = next(make_loader(load_records(str(synth_dir / "test.jsonl")), config, shard=(0, 1)))
    assert not caption["loss_mask"].any() and caption["attention_mask"].any()
    mcq = next(make_loader(load_records(str(synth_dir / "qa_test.jsonl")), config, shard=(0, 1)))
    assert mcq["answer"].dtype == np.int32 and not mcq["loss_mask"].any()


def test_audio_only_record(media_dir, synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.batch_size=1")
    path = media_dir / "audio_only.jsonl"
    path.write_text(json.dumps({"audio": "tone.flac", "question": "Q?", "options": ["a", "b"],
                                "answer": 1}) + "\n")
    batch = next(make_loader(load_records(str(path)), config, shard=(0, 1)))
    assert batch["pixel_values"].shape[1] == 1 and not batch["frame_mask"].any()
    assert batch["has_audio"].all() and not batch["has_video"].any()
    assert batch["audio_seconds"][0] == pytest.approx(1.5, abs=0.01)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(synth_dir, tmp_path):
    config = _config(synth_dir, tmp_path, "data.batch_size=3")
    records = load_records(str(synth_dir / "sft_train.jsonl"))[:12]
    inline = list(make_loader(records, config, shard=(0, 1), workers=0))
    loader = make_loader(records, config, shard=(0, 1), workers=2)
    try:
        got = [next(loader), next(loader)]
        state = loader.get_state()
    finally:
        loader.close()
    for a, b in zip(got, inline[:2], strict=True):
        _assert_same(a, b)
    resumed = make_loader(records, config, shard=(0, 1), workers=2)
    try:
        resumed.set_state(state)
        rest = list(resumed)
    finally:
        resumed.close()
    assert len(rest) == 2
    for a, b in zip(rest, inline[2:], strict=True):
        _assert_same(a, b)
    # grain's position is per worker: another worker count stops with the fix (it raised KeyError /
    # IndexError from inside grain), and data.num_workers is not a free change of a resumed run
    from vsalmonn_jax.data.pipeline import DataPositionError
    from vsalmonn_jax.training.run_config import is_free

    inline_loader = make_loader(records, config, shard=(0, 1), workers=0)
    with pytest.raises(DataPositionError, match="saved with data.num_workers=2 and this run has 0"):
        inline_loader.set_state(state)
    assert not is_free("data.num_workers")


def test_bucket_sizes():
    from vsalmonn_jax.data.collate import bucket_length, frame_bucket

    assert [bucket_length(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert bucket_length(100, (64, 96, 160)) == 160 and bucket_length(200, (64, 160)) == 256
    assert [frame_bucket(n, 110) for n in (0, 1, 3, 8, 9, 100, 110)] == [1, 1, 4, 8, 16, 110, 110]


def test_text_too_long_is_quarantined_not_dropped(synth_dir, tmp_path):
    from vsalmonn_jax.data.quarantine import Quarantine

    # text + media positions: 2 of the 4 records fit in 200 (the media add 107 each)
    config = _config(synth_dir, tmp_path, "data.max_length=200", "data.max_failure_share=0.9")
    records = load_records(str(synth_dir / "sft_train.jsonl"))[:4]
    batches = list(make_loader(records, config, shard=(0, 1), shuffle=False, num_epochs=3))
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    kept = sum(b["example_id"].shape[0] for b in batches)
    assert kept == 2 * 3 and len(lines) == 2        # 3 epochs: still one line per record
    assert all(x["reason"] == "text" and "> max_length 200" in x["detail"] for x in lines)
    # a restarted run appending to the same file adds only new (id, reason) pairs
    again = Quarantine(str(tmp_path / "quarantine.jsonl"), max_failure_share=1.0)
    again.add({"failed": "text", "id": lines[0]["id"], "example_id": 0, "detail": "again"})
    again.add({"failed": "corrupt", "id": lines[0]["id"], "example_id": 0, "detail": "new reason"})
    after = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert after[:2] == lines and [x["reason"] for x in after[2:]] == ["corrupt"]


def test_quarantine_share_is_checked_mid_run_after_min_seen(tmp_path):
    from vsalmonn_jax.data.quarantine import Quarantine

    q = Quarantine(str(tmp_path / "q.jsonl"), max_failure_share=0.25, min_seen=8)
    bad = {"failed": "corrupt", "id": "x", "example_id": np.int64(3), "detail": "d"}
    for _ in range(5):
        q.ok()
    for _ in range(2):
        q.add(bad)                       # 2 of 7 = 28.6 % but fewer than 8 seen: keep going
    with pytest.raises(TooManyFailures, match=r"3 of 8 records failed \(37.5% > "):
        q.add(bad)
    lines = (tmp_path / "q.jsonl").read_text().splitlines()
    assert len(lines) == 1 and q.failed == 3        # counted each time, written once per (id, reason)
    assert json.loads(lines[0])["example_id"] == 3
