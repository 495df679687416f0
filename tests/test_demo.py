"""The demo main job: quick end-to-end run (every stage's row in the report, resume skips finished
stages), plus fast unit checks of its report statistics, batching and config handling."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import fake_devices
import numpy as np
import pytest
from machine import scaled

REPO = pathlib.Path(__file__).resolve().parent.parent
# `--quick` shrunk further: every stage, round and arm still runs and compiles (the same functions as
# `--quick`), on fewer and shorter clips, batches, steps and captions: the test (demo, caption and
# resume, cold compile cache) took 161 CPU s, where `demo --quick` alone takes 240; 111 with the
# demo compiled without LLVM optimisation (compile_only). 8 validation clips, not 32: every stage
# captions both splits, and the test went from ~100 to 78 s (compile cache warm, quiet machine).
SMALL = ["--config.demo.n_train=16", "--config.demo.n_val=8", "--config.demo.n_test=8", "--config.demo.n_fresh=8",
         "--config.demo.n_rebirth=8", "--config.demo.batch_size=4", "--config.demo.eval_batch=8",
         "--config.demo.pretrain_steps=3", "--config.demo.align_steps=2", "--config.demo.sft_steps=3",
         "--config.demo.dpo_steps=2", "--config.demo.rebirth_steps=2", "--config.demo.bootstrap=50",
         "--config.demo.render_workers=1",
         # a 3-step model samples noise, judged as one false event per caption: at 32 tokens every
         # sample of round 2 tied (no pair, the round stops); 64 tokens give the samples' errors room
         # to differ (seeded, so this holds run to run)
         "--config.demo.max_caption_tokens=64"]
STAGES = ("pretrain", "align", "sft", "mrdpo_1", "mrdpo_2", "mrdpo_3", "control_1", "control_2",
          "control_3", "rebirth")


def _record(counts):
    return {"per_video": [{"id": str(i), "n": n, "missed": m, "incorrect": c, "hallucinated": h}
                          for i, (n, m, c, h) in enumerate(counts)]}


def test_paired_bootstrap_zero_for_identical_and_detects_a_shift():
    from vsalmonn_jax.demo.report import paired_bootstrap, verdict

    rng = np.random.default_rng(0)
    n = rng.integers(3, 10, size=300)
    base = [(int(k), int(rng.integers(0, k)), 0, int(rng.integers(0, 3))) for k in n]
    same = paired_bootstrap(_record(base), _record(base), 200)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    fewer_miss = [(k, max(m - 1, 0), i, h) for k, m, i, h in base]
    d = paired_bootstrap(_record(base), _record(fewer_miss), 200)
    expected = (sum(max(m - 1, 0) for _, m, _, _ in base) - sum(m for _, m, _, _ in base)) / n.sum()
    assert d["miss"][0] == pytest.approx(expected)
    assert d["miss"][2] < 0 and d["hallucination"] == (0.0, 0.0, 0.0)
    text = verdict({"b - a": d})[0]
    assert "Miss down" in text and "within noise: Incorrect, Hallucination" in text


def test_paired_bootstrap_needs_the_same_videos():
    from vsalmonn_jax.demo.report import paired_bootstrap

    with pytest.raises(ValueError, match="same videos"):
        paired_bootstrap(_record([(3, 1, 0, 0)]), _record([(3, 1, 0, 0), (2, 0, 0, 0)]), 10)


def test_media_batch_keeps_only_the_stage_modality():
    from vsalmonn_jax.demo.batches import media_batch

    media = {"vision": np.zeros((5, 8, 9, 4), np.float16), "audio": np.ones((5, 1, 40, 4), np.float16),
             "frame_mask": np.ones((5, 8), bool), "frame_times": np.zeros((5, 8), np.float32),
             "audio_seconds": np.full((5,), 4.0, np.float32)}
    rows = np.array([4, 0])
    audio = media_batch(media, rows, "audio")
    assert set(audio) == {"audio", "audio_seconds", "has_video", "has_audio"}
    assert not audio["has_video"].any() and audio["has_audio"].all()
    video = media_batch(media, rows, "video")
    assert "audio" not in video and video["vision"].shape == (2, 8, 9, 4)
    assert set(media_batch(media, rows, "av")) >= {"vision", "audio", "frame_mask"}


class _CharTokenizer:
    """One token per character (its code point): enough for time_token_fields."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_time_tokens_reach_the_batches_their_mode_gives():
    """data.time_tokens=all: video and audio-visual batches carry frame i's "i.0"; official: only
    the video-only batches (the release: video with audio gets none); none: no time fields."""
    from vsalmonn_jax.demo.batches import media_batch
    from vsalmonn_jax.demo.data import add_time_tokens

    media = {"vision": np.zeros((2, 8, 9, 4), np.float16), "audio": np.ones((2, 1, 40, 4), np.float16),
             "frame_mask": np.arange(8)[None, :] < np.array([[3], [5]]),
             "frame_times": np.zeros((2, 8), np.float32), "audio_seconds": np.array([3.0, 5.0]),
             "video_seconds": np.array([3.0, 5.0])}
    rows = np.array([1, 0])
    assert "time_ids" not in media_batch(add_time_tokens(media, _CharTokenizer(), "none"), rows, "av")
    timed = add_time_tokens(media, _CharTokenizer(), "all")
    for modality in ("video", "av"):
        batch = media_batch(timed, rows, modality)
        text = ["".join(chr(c) for c in ids[keep]) for ids, keep in
                zip(batch["time_ids"].reshape(-1, 4), batch["time_mask"].reshape(-1, 4))]
        assert text[:6] == ["1.0", "2.0", "3.0", "4.0", "5.0", ""]          # row 0: clip 1, 5 frames
        assert text[8:12] == ["1.0", "2.0", "3.0", ""]                      # row 1: clip 0, 3 frames
    assert "time_ids" not in media_batch(timed, rows, "audio")
    official = add_time_tokens(media, _CharTokenizer(), "official")
    assert media_batch(official, rows, "video")["time_mask"].sum() == 3 * (5 + 3)
    assert not media_batch(official, rows, "av")["time_mask"].any()


def test_an_example_modality_narrows_what_its_row_uses():
    """demo.align_llm mixes audio-only and video-only rows in one "av" batch: each row's flags say
    what it uses, and a video-only row keeps its time tokens under data.time_tokens=official."""
    from vsalmonn_jax.demo.batches import build_batch
    from vsalmonn_jax.demo.data import add_time_tokens

    media = {"vision": np.zeros((3, 4, 9, 4), np.float16), "audio": np.ones((3, 1, 40, 4), np.float16),
             "frame_mask": np.ones((3, 4), bool), "frame_times": np.zeros((3, 4), np.float32),
             "audio_seconds": np.full((3,), 4.0), "video_seconds": np.full((3,), 4.0)}
    media = add_time_tokens(media, _CharTokenizer(), "official")
    row = (np.array([1, 2, 3], np.int32), np.array([False, True, True]))
    examples = [{"split": "train", "row": 0, "text": row, "modality": "audio"},
                {"split": "train", "row": 1, "text": row, "modality": "video"},
                {"split": "train", "row": 2, "text": row}]
    batch = build_batch(examples, {"train": media}, 8, 0, "av")
    assert batch["has_video"].tolist() == [False, True, True]
    assert batch["has_audio"].tolist() == [True, False, True]
    assert "vision" in batch and "audio" in batch
    assert batch["time_mask"].any(axis=(1, 2)).tolist() == [False, True, False]


def test_text_batch_pads_to_the_fixed_length():
    from vsalmonn_jax.demo.batches import text_batch

    rows = [(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool)),
            (np.array([8], np.int32), np.array([1], bool))]
    b = text_batch(rows, 6, pad_id=0, prefix="chosen_")
    assert b["chosen_input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert b["chosen_attention_mask"].sum(1).tolist() == [3, 1]
    assert b["chosen_loss_mask"].tolist()[0] == [False, True, True, False, False, False]


def test_quick_overrides_and_cli_overrides_apply_in_order():
    from vsalmonn_jax.commands.demo import demo_config

    full = demo_config(False, None, [])
    quick = demo_config(True, None, ["--config.demo.sft_steps=7"])
    assert full.demo.n_test >= 500 and full.mrdpo.rounds >= 3
    assert quick.demo.n_test == full.demo.quick.n_test and quick.demo.sft_steps == 7


@pytest.mark.slow
def test_quick_demo_end_to_end_and_resume(tmp_path):
    env = fake_devices.env(1)   # one CPU device, as users run it
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vsalmonn_jax.cli", "demo", "--quick", "--out", str(out),
           f"--config.workdir={tmp_path}", *SMALL]   # the shared data folder goes under tmp_path too
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(1500))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Report written to {out / 'report.md'}" in done.stdout
    report = (out / "report.md").read_text()
    for stage in STAGES:
        row = re.search(rf"^\| {stage} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
        assert row, f"no table row for stage {stage}"
        miss, incorrect, hall, total = (float(x) for x in row.groups())
        assert total == pytest.approx(miss + incorrect + hall, abs=0.15)
        assert f"[{stage}] test: Miss" in done.stdout
    assert "What is within noise" in report and "mrdpo_3 vs control_3" in report
    # issue 17: a validation split read per stage, length diagnostics, the pre-registered verdict
    assert all((out / "stages" / s / "val.json").exists() for s in STAGES)
    assert all(f"[{s}] val: Miss" in done.stdout for s in STAGES)
    assert "## Validation split (where choices are read)" in report and "## Length diagnostics" in report
    assert re.search(r"\*\*Pre-registered verdict: (REPRODUCED|NOT REPRODUCED|UNDECIDED)\*\*", report)
    for png in ("error_rates.png", "qa_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "data").resolve().parent == tmp_path / "demo-data"
    # the final model captions a clip the run never saw, with no flag but the run directory
    assert f"vsalmonn-jax caption VIDEO.mp4 --checkpoint {out} --output captions.jsonl" in report
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.data import synthetic

    config = demo_config(True, None, [])
    synthetic.render_split(str(tmp_path / "unseen"), int(config.demo.seed) + 1, "test", 0, 1,
                           synthetic.synthetic_config(config))
    unseen = str(tmp_path / "unseen" / synthetic.clip_path("test", 0))
    captions = tmp_path / "captions.jsonl"
    cap = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "caption", unseen, "--checkpoint",
                          str(out), "--output", str(captions), "--no-progress"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=scaled(900))
    assert cap.returncode == 0 and "stage rebirth" in cap.stderr, cap.stderr[-3000:]
    (line,) = captions.read_text().splitlines()
    assert json.loads(line)["video"] == unseen and json.loads(line)["num_tokens"] >= 1
    again = subprocess.run(cmd[:4] + ["--quick", "--resume", str(out), *cmd[7:]], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=scaled(600))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all(f"[{s}] finished earlier: skipped" in again.stdout for s in STAGES)
    assert "[pretrain] start" not in again.stdout


def test_text_only_rows_turn_their_media_flags_off():
    from vsalmonn_jax.demo.batches import build_batch

    media = {"train": {"vision": np.zeros((3, 8, 9, 4), np.float16),
                       "frame_mask": np.ones((3, 8), bool), "frame_times": np.zeros((3, 8), np.float32)}}
    row = (np.array([1, 2, 3], np.int32), np.array([0, 1, 1], bool))
    examples = [{"split": "train", "row": 2, "text": row},
                {"split": "train", "row": 0, "text": row, "media": False}]
    batch = build_batch(examples, media, 5, 0, "video")
    assert batch["has_video"].tolist() == [True, False]
    assert not batch["has_audio"].any() and batch["vision"].shape == (2, 8, 9, 4)


def _eval_record(rng, n_videos=40):
    counts = [(int(k), int(rng.integers(0, k)), 0, int(rng.integers(0, 2)))
              for k in rng.integers(3, 8, size=n_videos)]
    n, m, i, h = (float(sum(c[j] for c in counts)) for j in range(4))
    micro = {"miss": m / n, "incorrect": i / n, "hallucination": h / n,
             "incorrect_plus_hallucination": (i + h) / n, "total": (m + i + h) / n}
    return {"aggregate": {"micro": micro, "videos": n_videos, "events": int(n)},
            "repetition": {"seq_rep_4": 0.1, "duplicate_sentence_rate": 0.0, "no_end_token_rate": 0.0},
            "qa": {"accuracy": 0.5}, **_record(counts)}


def test_report_only_writes_a_partial_report_from_finished_stages(tmp_path, monkeypatch, capsys):
    import json

    from vsalmonn_jax.commands.demo import main

    rng = np.random.default_rng(1)
    for name in ("pretrain", "align", "sft", "mrdpo_1"):
        folder = tmp_path / "stages" / name
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps(_eval_record(rng)))
        (folder / "done").write_text("")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["--report-only"]) == 2   # needs --resume, and creates no run folder
    assert list(cwd.iterdir()) == []
    assert main(["--resume", str(tmp_path), "--report-only"]) == 0
    assert list(cwd.iterdir()) == [] and not (tmp_path / "data").exists()   # no data folder made
    report = (tmp_path / "report.md").read_text()
    assert "Partial report: stage(s) not finished: mrdpo_2, mrdpo_3, control_1" in report
    assert re.search(r"^\| mrdpo_1 vs sft \|", report, re.M)
    assert (tmp_path / "error_rates.png").exists()
    # a resume with other settings than the run's saved ones is refused, naming them (it went on
    # silently with the command line's, e.g. a --quick run resumed without --quick)
    from vsalmonn_jax.commands.demo import demo_config

    (tmp_path / "config.json").write_text(demo_config(True, None, []).to_json_best_effort())
    assert main(["--resume", str(tmp_path), "--quick", "--report-only"]) == 0
    assert main(["--resume", str(tmp_path), "--report-only"]) == 2
    assert main(["--resume", str(tmp_path), "--quick", "--config.demo.dpo_steps=7"]) == 2
    assert "demo.dpo_steps: 6 -> 7" in capsys.readouterr().err


def test_runs_with_the_same_data_settings_share_one_data_folder(tmp_path):
    from vsalmonn_jax.commands.demo import demo_config, resolve_data_dir

    config = demo_config(True, None, [f"--config.workdir={tmp_path}"])
    first = resolve_data_dir(config, tmp_path / "a", "")
    second = resolve_data_dir(config, tmp_path / "b", "")
    assert first.resolve() == second.resolve() and first.resolve().parent == tmp_path / "demo-data"
    other = demo_config(True, None, [f"--config.workdir={tmp_path}", "--config.demo.n_test=3"])
    assert resolve_data_dir(other, tmp_path / "c", "").resolve() != first.resolve()
    steps = demo_config(True, None, [f"--config.workdir={tmp_path}", "--config.demo.sft_steps=3"])
    assert resolve_data_dir(steps, tmp_path / "d", "").resolve() == first.resolve()  # training only
    assert resolve_data_dir(config, tmp_path / "e", str(tmp_path / "mine")) == tmp_path / "mine"
    first.resolve().rmdir()   # the shared folder deleted: a resumed run makes it anew
    assert resolve_data_dir(config, tmp_path / "a", "").is_dir()
    # a field added later keeps older folders' keys at the value they had, and changes it otherwise
    from vsalmonn_jax.demo.data import data_key

    older = config.copy_and_resolve_references()
    with older.unlocked():
        del older.data["video_audio"]
    assert data_key(older) == data_key(config)
    config.data.video_audio = "record"
    assert data_key(config) != data_key(older)
