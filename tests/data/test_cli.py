"""`vsalmonn-jax data synth|check` end to end (in-process through the CLI dispatcher)."""

import json
import shutil

from machine import scaled

from vsalmonn_jax.cli import main


def test_synth_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--n", "2", "--n-val", "1", "--n-test", "1",
                 "--seed", "3"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 2, "val": 1, "test": 1} and meta["seed"] == 3
    assert len(list((out / "media").glob("*/*.mp4"))) == 4
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert "splits" in capsys.readouterr().out
    assert main(["data", "check", str(out / "sft_train.jsonl")]) == 0
    summary = capsys.readouterr().out
    assert "0 invalid, 0 media/text failures" in summary and "decoded" in summary


def test_check_reports_bad_records_and_stops_on_malformed_json(synth_dir, media_dir, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(synth_dir / "media/train/train_000000.mp4", root / "ok.mp4")
    shutil.copy(media_dir / "zero.mp4", root / "zero.mp4")
    lines = [{"video": "ok.mp4", "events": []}, {"video": "../escape.mp4", "events": []},
             {"video": "zero.mp4", "events": []}]
    path = root / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "3 records, 2 valid (caption 2), 1 invalid, 1 media/text failures" in out
    assert f"bad: {path}:2: media path '../escape.mp4' escapes the data root" in out
    assert f"bad: {path}:3: empty:" in out
    with open(path, "a") as f:
        f.write('{"video": "ok.mp4", "events": [\n')
    assert main(["data", "check", str(path)]) == 2
    assert f"{path}:4: malformed JSON" in capsys.readouterr().err


def test_check_encodes_text_with_a_tokenizer(synth_dir, capsys):
    path = str(synth_dir / "sft_val.jsonl")
    assert main(["data", "check", path, "--no-decode",
                 f"--config.data.tokenizer={synth_dir / 'tokenizer'}"]) == 0
    assert main(["data", "check", path, "--no-decode", "--config.data.max_length=60",
                 f"--config.data.tokenizer={synth_dir / 'tokenizer'}"]) == 1
    out = capsys.readouterr().out
    assert f"bad: {path}:1: text: conversation is" in out and "> max_length 60" in out


def test_check_with_the_7b_preset_cuts_audio_to_the_video(format_clips, tmp_path, capsys):
    """configs/7b.py decodes as the release does: a 31-s track on a 30-s video is read as 30 s (the
    record names its sound, as the release's audio-visual records do: here the file's own track)."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"video": "v30_a31.mp4", "audio": "v30_a31.mp4", "events": []}) + "\n")
    check = ["data", "check", str(path), "--root", str(format_clips), "--config", "7b"]
    assert main(check) == 0
    assert "frames 30-30, audio 30.0-30.0 s" in capsys.readouterr().out
    assert main(check + ["--config.data.audio_cut=none"]) == 0
    assert "frames 30-30, audio 31.0-31.0 s" in capsys.readouterr().out


def test_check_free_text_events_through_the_cli(synth_dir, tmp_path):
    """The official test set's form (events as plain strings) passes `data check`, media decoded."""
    import os
    import pathlib
    import subprocess
    import sys

    shutil.copy(synth_dir / "media/train/train_000000.mp4", tmp_path / "clip.mp4")
    path = tmp_path / "free.jsonl"
    path.write_text(json.dumps({"id": "c0", "video": "clip.mp4", "events": [
        "A red square slides to the left.", "A low beep sounds twice."]}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "data", "check", str(path)],
                          capture_output=True, text=True, timeout=scaled(300), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 records, 1 valid (caption 1), 0 invalid, 0 media/text failures" in done.stdout
    assert "decoded 1: frames" in done.stdout


def test_check_fails_on_empty_nan_list_ids_and_non_utf8(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["data", "check", str(empty)]) == 1
    assert f"bad: {empty}: holds no records (empty file)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "events": [{"time": NaN, "modality": "audio", "subject": "s", '
                   '"action": "a"}]}\n{"id": [1], "audio": "x.wav", "events": []}\n')
    assert main(["data", "check", str(bad), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert f"bad: {bad}:1: events[0].time must be a finite number >= 0" in out
    assert f"bad: {bad}:2: field 'id' must be a string or an integer, got [1]" in out
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"audio": "x.wav", "events": ["caf\u00e9"]}\n'.encode("latin-1"))
    assert main(["data", "check", str(latin)]) == 2
    assert f"{latin}:1: not UTF-8 text (byte 0xe9" in capsys.readouterr().err
