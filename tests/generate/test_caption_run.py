"""Caption job plumbing with a fake backend: inputs, JSONL output, bad-item skipping, resume."""

import json

import pytest

from vsalmonn_jax.generate.caption_io import (
    InputError,
    discover_items,
    jsonl_items,
    read_done,
)
from vsalmonn_jax.generate.caption_run import UnreadableInput, run_captions


class FakeBackend:
    def __init__(self, batch_size=3, bad=(), crash_after=None):
        self.batch_size, self.bad, self.crash_after = batch_size, set(bad), crash_after
        self.batches, self.prepared = [], []

    def prepare(self, item):
        self.prepared.append(item["id"])
        if any(item["id"].endswith(b) for b in self.bad):
            raise UnreadableInput("undecodable: invalid data found when processing input")
        return item["id"].upper()

    def caption(self, rows):
        if self.crash_after is not None and len(self.batches) == self.crash_after:
            raise KeyboardInterrupt
        self.batches.append([(item["id"], sample) for item, sample, _ in rows])
        return [{"caption": f"{prep} #{sample}", "stopped": True, "num_tokens": 3, "logprob": -1.0}
                for _, sample, prep in rows]


def _files(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    return [str(tmp_path / n) for n in names]


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_discover_files_folders_and_jsonl(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "sub").mkdir()
    _files(media, ["b.mp4", "a.mkv", "notes.txt", "c.wav"])
    _files(media / "sub", ["d.webm"])
    records = tmp_path / "set.jsonl"
    records.write_text("\n".join([
        json.dumps({"id": "r1", "video": "media/b.mp4", "prompt": "What happens?"}),
        json.dumps({"id": "r2"}),
        "",
        json.dumps({"video": "../outside.mp4"}),
        json.dumps({"audio": "media/c.wav", "events": []}),
    ]) + "\n")
    items, errors = discover_items([str(media), str(records), str(tmp_path / "missing.mp4")])
    ids = [i["id"] for i in items]
    assert ids[:4] == [str(media / n) for n in ("a.mkv", "b.mp4", "c.wav")] + [str(media / "sub/d.webm")]
    assert ids[4:] == ["r1", "set.jsonl:5"]
    assert items[2]["audio"].endswith("c.wav") and "video" not in items[2]
    assert items[4] == {"id": "r1", "video": str(media / "b.mp4"), "prompt": "What happens?",
                        "line": 1, "source": str(records)}
    assert errors == [f"{records}:2: the record has neither 'video' nor 'audio'",
                      f"{records}:4: media path '../outside.mp4' escapes the data root {tmp_path}",
                      f"{tmp_path / 'missing.mp4'}: no such file or folder"]
    with pytest.raises(InputError, match="cannot read"):
        jsonl_items(str(tmp_path / "nope.jsonl"))
    # data.video_audio=record: a video named as a file keeps its own track ("audio" = itself);
    # a record follows its fields (r1 has no "audio": visual-only there)
    own, _ = discover_items([str(media), str(records)], own_track=True)
    assert own[1]["audio"] == own[1]["video"] == str(media / "b.mp4")
    assert "video" not in own[2] and "audio" not in own[4]


def test_run_writes_one_line_per_sample_and_skips_bad(tmp_path):
    paths = _files(tmp_path, ["v0.mp4", "v1.mp4", "broken.mp4", "v3.mp4"])
    items, _ = discover_items(paths)
    out, errs = str(tmp_path / "out.jsonl"), str(tmp_path / "out.errors.jsonl")
    warnings = []
    backend = FakeBackend(batch_size=4, bad=["broken.mp4"])
    summary = run_captions(items, backend, output=out, errors_output=errs, num_samples=2,
                           progress=False, warn=warnings.append)
    lines = _lines(out)
    assert [(r["id"].rsplit("/", 1)[1], r["sample"]) for r in lines] == [
        ("v0.mp4", 0), ("v0.mp4", 1), ("v1.mp4", 0), ("v1.mp4", 1), ("v3.mp4", 0), ("v3.mp4", 1)]
    assert lines[0]["caption"] == f"{paths[0].upper()} #0" and lines[0]["video"] == paths[0]
    assert [len(b) for b in backend.batches] == [4, 2]
    assert backend.prepared.count(paths[0]) == 1              # prepared once for both samples
    assert summary.written == 6 and summary.total == 8 and summary.already_done == 0
    assert [f["id"] for f in summary.failed] == [paths[2]]
    assert warnings == [f"caption: skipped {paths[2]}: undecodable: invalid data found when "
                        "processing input"]
    assert _lines(errs) == [{"id": paths[2], "video": paths[2], "audio": None,
                             "error": "undecodable: invalid data found when processing input"}]


def test_resume_after_interruption_redoes_only_missing(tmp_path):
    paths = _files(tmp_path, [f"v{i}.mp4" for i in range(5)])
    items, _ = discover_items(paths)
    out, errs = str(tmp_path / "out.jsonl"), str(tmp_path / "err.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_captions(items, FakeBackend(batch_size=2, crash_after=1), output=out,
                     errors_output=errs, progress=False)
    assert len(_lines(out)) == 2
    with open(out, "a") as handle:                 # a crash in the middle of a line
        handle.write('{"id": "' + paths[2] + '", "sam')
    assert read_done(out) == {(paths[0], 0), (paths[1], 0)}
    assert open(out).read().endswith("\n")         # the fragment was cut off
    backend = FakeBackend(batch_size=2)
    summary = run_captions(items, backend, output=out, errors_output=errs, progress=False)
    assert summary.already_done == 2 and summary.written == 3
    assert backend.prepared == paths[2:]
    assert [r["id"] for r in _lines(out)] == paths
    again = FakeBackend(batch_size=2)
    assert run_captions(items, again, output=out, errors_output=errs, progress=False).written == 0
    assert again.prepared == [] and len(_lines(out)) == 5


def test_resume_refuses_foreign_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "not ours"}\n')
    with pytest.raises(InputError, match="out.jsonl:1: not a caption line"):
        read_done(str(out))


def test_caption_cli_usage_errors(tmp_path, capsys):
    from vsalmonn_jax.commands.caption import main

    video = _files(tmp_path, ["v.mp4"])[0]
    assert main([video, "--checkpoint", str(tmp_path)]) == 2
    assert "no run config.json" in capsys.readouterr().err      # a bare folder: --config needed
    base = [video, "--checkpoint", str(tmp_path), "--config", "tiny", "--tokenizer", str(tmp_path)]
    assert main(base + ["--num-samples", "3"]) == 2
    assert "--num-samples > 1 needs sampling" in capsys.readouterr().err
    assert main(base + ["--greedy", "--top-p", "0.9"]) == 2
    assert "--greedy cannot be combined" in capsys.readouterr().err
    assert main([video, "--checkpoint", str(tmp_path), "--config", "tiny"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_sampling_flags_imply_sampling():
    import argparse

    from vsalmonn_jax.commands.caption import sampling_from_args
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.generate.sampling import SamplingConfig

    gen = load_config("tiny").generate               # greedy by default, top_p 0.9
    args = lambda **kw: argparse.Namespace(**{"greedy": False, "top_p": None, "top_k": None,
                                              "temperature": None, **kw})
    assert sampling_from_args(args(), gen).greedy
    assert sampling_from_args(args(top_p=0.8), gen) == SamplingConfig(
        greedy=False, temperature=1.0, top_k=0, top_p=0.8)
    assert sampling_from_args(args(temperature=0.7), gen) == SamplingConfig(
        greedy=False, temperature=0.7, top_k=0, top_p=0.9)


def test_duplicate_record_ids_stop_before_any_model(tmp_path, capsys):
    """4 records with 2 ids used to give 2 captions silently: now an error naming both lines."""
    from vsalmonn_jax.commands.caption import main

    _files(tmp_path, ["a.mp4", "b.mp4"])
    records = tmp_path / "set.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "x", "video": "a.mp4"}, {"id": "y", "video": "b.mp4"},
        {"id": "x", "video": "b.mp4"}, {"id": "y", "video": "a.mp4"}]))
    with pytest.raises(InputError, match=f"duplicate id 'x': {records}:1 and {records}:3"):
        discover_items([str(records)])
    # the same file named twice (a file and its folder) is still one item, no error
    items, errors = discover_items([str(tmp_path / "a.mp4"), str(tmp_path)])
    assert [i["id"] for i in items] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    assert errors == []
    out = tmp_path / "out.jsonl"
    rc = main([str(records), "--checkpoint", str(tmp_path / "no-run"), "--config", "tiny",
               "--tokenizer", str(tmp_path / "no-tokenizer"), "--output", str(out)])
    assert rc == 2 and not out.exists()      # stopped before the tokenizer / model were loaded
    assert f"duplicate id 'x': {records}:1 and {records}:3" in capsys.readouterr().err


def test_help_texts_name_the_default_output_and_are_complete(capsys):
    from vsalmonn_jax.cli import main

    for command in ("caption", "export"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: captions.jsonl in the current folder" in text
    assert "a trained checkpoint -> a directory that `transformers` loads directly" in text
    assert "(a transformers Qwen2 directory, text-only LLM)" in text   # the last line: complete


def test_a_batch_the_device_fails_on_is_retried_an_item_at_a_time(tmp_path):
    """One item too large for the device (an out-of-memory in its batch) stopped the whole run, and a
    resume rebuilt the same batch and failed again; now only that item is reported."""
    import jax

    class Oom(FakeBackend):
        def caption(self, rows):
            if any(item["id"].endswith("huge.mp4") for item, _, _ in rows):
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
            return super().caption(rows)

    paths = _files(tmp_path, ["a.mp4", "huge.mp4", "c.mp4", "d.mp4"])
    items, _ = discover_items(paths)
    out, errs = str(tmp_path / "out.jsonl"), str(tmp_path / "out.errors.jsonl")
    backend = Oom(batch_size=4)
    summary = run_captions(items, backend, output=out, errors_output=errs, num_samples=2,
                           progress=False, warn=lambda text: None)
    assert sorted((r["id"].rsplit("/", 1)[1], r["sample"]) for r in _lines(out)) == [
        (n, s) for n in ("a.mp4", "c.mp4", "d.mp4") for s in (0, 1)]
    assert [f["id"] for f in summary.failed] == [paths[1]]
    assert "captioning failed on the device: JaxRuntimeError: RESOURCE_EXHAUSTED" in \
        summary.failed[0]["error"]
    assert _lines(errs)[0]["id"] == paths[1]

    # a backend that can pad to fewer rows (AVCaptioner.rows_per_call): the huge clip fits alone
    import contextlib

    class Padded(Oom):
        @contextlib.contextmanager
        def rows_per_call(self, rows):
            saved, self.batch_size = self.batch_size, rows
            try:
                yield
            finally:
                self.batch_size = saved

        def caption(self, rows):
            if self.batch_size > 2:
                return Oom.caption(self, rows)
            return FakeBackend.caption(self, rows)

    out3 = str(tmp_path / "o3.jsonl")
    padded = Padded(batch_size=4)
    summary = run_captions(items, padded, output=out3, errors_output=str(tmp_path / "e3.jsonl"),
                           num_samples=2, progress=False, warn=lambda text: None)
    assert not summary.failed and len(_lines(out3)) == 8 and padded.batch_size == 4

    class Bug(FakeBackend):   # any other error is a bug: it propagates, nothing is hidden
        def caption(self, rows):
            raise TypeError("unexpected keyword")

    with pytest.raises(TypeError, match="unexpected keyword"):
        run_captions(items, Bug(), output=str(tmp_path / "o2.jsonl"),
                     errors_output=str(tmp_path / "e2.jsonl"), progress=False)


def test_a_caption_resume_may_change_how_the_model_runs_not_what_it_computes():
    """The settings a caption resume compares: frames, audio, format and the model's shapes; not
    runtime knobs (a smaller frame_chunk after an out-of-memory error was refused)."""
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.generate.caption_io import RUNTIME_FIELDS, input_settings

    base = input_settings(load_config("7b"))
    runtime = ["model.vision.frame_chunk=2", "model.llm.attention_impl=xla", "model.llm.scan_layers=False",
               "model.audio.chunk_batch=1", "model.lora.dropout=0.0", "model.llm.remat_policy=none"]
    assert input_settings(load_config("7b", runtime)) == base
    assert not set(RUNTIME_FIELDS) & set(base)
    for change in ("data.max_frames=64", "model.llm.num_layers=2", "data.audio_channel=mean"):
        assert input_settings(load_config("7b", [change])) != base, change


def test_the_av_captioner_pads_a_retry_to_its_rows_on_the_mesh():
    from vsalmonn_jax.generate.captioner import AVCaptioner

    captioner = AVCaptioner.__new__(AVCaptioner)   # the padding rule only: no model
    captioner.batch_size, captioner.shards = 8, 2
    with captioner.rows_per_call(3):
        assert captioner.batch_size == 4                 # 3 rows, a multiple of the 2 batch shards
    assert captioner.batch_size == 8
    with captioner.rows_per_call(20):
        assert captioner.batch_size == 8                 # never more than the configured batch
