"""`vsalmonn-jax data synth|check` end to end (in-process through the CLI dispatcher)."""

import json
import shutil

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
    """configs/7b.py decodes as the release does: a 31-s track on a 30-s video is read as 30 s."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"video": "v30_a31.mp4", "events": []}) + "\n")
    check = ["data", "check", str(path), "--root", str(format_clips), "--config", "7b"]
    assert main(check) == 0
    assert "frames 30-30, audio 30.0-30.0 s" in capsys.readouterr().out
    assert main(check + ["--config.data.audio_cut=none"]) == 0
    assert "frames 30-30, audio 31.0-31.0 s" in capsys.readouterr().out
