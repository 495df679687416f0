"""`vsalmonn-jax eval`: report directory (JSON, Markdown, plots), groups per model/stage, collapse,
QA, clear errors for bad inputs."""

import dataclasses
import json

import numpy as np
import pytest
from machine import scaled

from vsalmonn_jax import cli
from vsalmonn_jax.atomic_file import write_jsonl
from vsalmonn_jax.data import synthetic_scene
from vsalmonn_jax.data.event_grammar import render_caption
from vsalmonn_jax.eval.exact import ExactJudge
from vsalmonn_jax.eval.inject import inject_errors
from vsalmonn_jax.eval.records import load_captions, load_gt
from vsalmonn_jax.eval.run import evaluate


def scenes(n=6):
    return [synthetic_scene.make_scene(5, i) for i in range(n)]


@pytest.fixture
def files(tmp_path):
    clips = scenes()
    gt = tmp_path / "gt.jsonl"
    write_jsonl(gt, [{"id": f"v{i}", "events": s.events} for i, s in enumerate(clips)])
    rng = np.random.default_rng(0)
    rows = []
    for i, s in enumerate(clips):
        rows.append({"id": f"v{i}", "caption": synthetic_scene.reference_caption(s), "model": "tiny",
                     "stage": "rebirth"})
        rows.append({"id": f"v{i}", "caption": inject_errors(s.events, rng), "model": "tiny",
                     "stage": "sft"})
    # a runaway caption without an end token: its repeats are collapsed before judging
    loop = render_caption(clips[4].events[:1])
    assert rows[9]["id"] == "v4" and rows[9]["stage"] == "sft"
    rows[9] = {**rows[9], "caption": " ".join([loop] * 8), "stopped": False}
    captions = tmp_path / "captions.jsonl"
    write_jsonl(captions, rows[:-1])  # v5 of stage sft has no caption: listed, not dropped
    return gt, captions, clips


def test_exact_report_directory(files, tmp_path, capsys):
    gt, captions, clips = files
    out = tmp_path / "report"
    rc = cli.main(["eval", "--captions", str(captions), "--gt", str(gt), "--judge", "exact",
                   "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tiny/rebirth: 6/6 captions scored (0 of 6 ground-truth videos have no caption)" in printed and "total=0.0%" in printed
    report = json.loads((out / "report.json").read_text())
    groups = {g["label"]: g for g in report["groups"]}
    assert set(groups) == {"tiny/rebirth", "tiny/sft"}
    rebirth, sft = groups["tiny/rebirth"], groups["tiny/sft"]
    assert rebirth["aggregate"]["micro"]["total"] == 0.0
    assert rebirth["aggregate"]["events"] == sum(len(s.events) for s in clips)
    assert sft["uncaptioned_ids"] == ["v5"] and sft["collapsed_captions"] == 1
    assert sft["repetition"]["no_end_token_rate"] == pytest.approx(1 / 5)
    assert sft["aggregate"]["micro"]["total"] > 0
    # the collapsed caption keeps one sentence: v4 (the runaway one) has exactly its first event
    per_video = [json.loads(line) for line in (out / "per_video.jsonl").read_text().splitlines()]
    assert len(per_video) == 11
    v4 = next(r for r in per_video if r["stage"] == "sft" and r["id"] == "v4")
    assert (v4["hallucinated"], v4["incorrect"], v4["missed"]) == (0, 0, len(clips[4].events) - 1)
    md = (out / "report.md").read_text()
    assert "| tiny/rebirth | 6 | 6 | 0 |" in md and "without a caption: `v5`" in md
    assert "runaway repeats collapsed in 1" in md
    for name in ("error_rates.png", "repetition.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_collapse_is_applied_before_judging(files):
    gt, captions, clips = files
    records = [r for r in load_captions(captions) if r.stage == "sft" and r.id == "v4"]
    assert not records[0].stopped
    result = evaluate(records, load_gt(gt), ExactJudge())
    score = result["groups"][0]["scores"][0]
    # 8 copies of the first event's sentence: one is kept and correct, none hallucinated
    assert (score.hallucinated, score.incorrect, score.missed) == (0, 0, len(clips[4].events) - 1)
    as_stopped = evaluate([dataclasses.replace(records[0], stopped=True)], load_gt(gt), ExactJudge())
    assert as_stopped["groups"][0]["scores"][0].hallucinated == 7


def test_qa_in_report_and_qa_subcommand(files, tmp_path):
    gt, captions, _ = files
    questions = tmp_path / "qa.jsonl"
    write_jsonl(questions, [{"id": "q1", "question": "?", "options": ["x", "y"], "answer": 1,
                             "category": "sound"},
                            {"id": "q2", "question": "?", "options": ["x", "y"], "answer": "A",
                             "category": "shape"}])
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{"id": "q1", "response": "B", "model": "tiny", "stage": "sft"},
                        {"id": "q2", "response": "B", "model": "tiny", "stage": "sft"}])
    out = tmp_path / "r"
    assert cli.main(["eval", "--captions", str(captions), "--gt", str(gt), "--judge", "exact",
                     "--out", str(out), "--qa-questions", str(questions),
                     "--qa-predictions", str(preds)]) == 0
    qa = json.loads((out / "report.json").read_text())["qa"]["tiny/sft"]
    assert qa["accuracy"] == 0.5 and qa["per_category"]["category"]["sound"]["accuracy"] == 1.0
    assert "## Multiple-choice QA" in (out / "report.md").read_text()
    assert cli.main(["eval", "qa", "--questions", str(questions), "--predictions", str(preds),
                     "--out", str(tmp_path / "qa")]) == 0
    assert json.loads((tmp_path / "qa" / "qa.json").read_text())["tiny/sft"]["correct"] == 1


def test_bad_inputs_give_clear_errors(files, tmp_path, capsys):
    gt, captions, _ = files
    stray = tmp_path / "stray.jsonl"
    write_jsonl(stray, [{"id": "nope", "caption": "At 1 s, x appears."}])
    assert cli.main(["eval", "--captions", str(stray), "--gt", str(gt), "--judge", "exact",
                     "--out", str(tmp_path / "o")]) == 2
    assert "1 caption id(s) have no ground truth: 'nope'" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "v0", "caption": "ok"}\n{"id": "v1", "caption": \n')
    assert cli.main(["eval", "--captions", str(broken), "--gt", str(gt), "--judge", "exact",
                     "--out", str(tmp_path / "o")]) == 2
    assert f"{broken}:2: not valid JSON" in capsys.readouterr().err
    nocap = tmp_path / "nocap.jsonl"
    write_jsonl(nocap, [{"id": "v0", "caption": 3}])
    assert cli.main(["eval", "--captions", str(nocap), "--gt", str(gt), "--judge", "exact",
                     "--out", str(tmp_path / "o")]) == 2
    assert f"{nocap}:1: field 'caption' must be str, got int" in capsys.readouterr().err
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, [{"id": "v0", "caption": "a"}, {"id": "v0", "caption": "b"}])
    assert cli.main(["eval", "--captions", str(dup), "--gt", str(gt), "--out", str(tmp_path / "o")]) == 2
    assert "duplicate caption for id 'v0'" in capsys.readouterr().err
    assert cli.main(["eval", "--captions", str(captions), "--gt", str(gt), "--judge", "exact",
                     "--out", str(tmp_path / "o"), "--config.eval.no_such_field=1"]) == 2
    assert "no field 'no_such_field'" in capsys.readouterr().err


def test_config_defaults_match_the_judge_options():
    import dataclasses

    from vsalmonn_jax.defaults import base_config
    from vsalmonn_jax.eval.embedding import EmbeddingOptions
    from vsalmonn_jax.eval.llm_judge import LlmOptions

    section = base_config().eval
    for cls, prefix in ((EmbeddingOptions, "embedding"), (LlmOptions, "llm")):
        for field in dataclasses.fields(cls):
            key = f"{prefix}_{field.name}" if f"{prefix}_{field.name}" in section else field.name
            if key in section:
                assert section[key] == field.default, (key, section[key], field.default)


def test_sample_indices_are_separate_groups(files, tmp_path):
    gt, _, clips = files
    rows = [{"id": f"v{i}", "caption": synthetic_scene.reference_caption(s), "sample": 0,
             "video": f"media/v{i}.mp4", "num_tokens": 12} for i, s in enumerate(clips)]
    rows += [{"id": "v0", "caption": "", "sample": 1, "stopped": False}]  # the `caption` command's lines
    write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "s"
    assert cli.main(["eval", "--captions", str(tmp_path / "samples.jsonl"), "--gt", str(gt),
                     "--judge", "exact", "--out", str(out)]) == 0
    groups = {g["label"]: g for g in json.loads((out / "report.json").read_text())["groups"]}
    assert groups["captions"]["aggregate"]["micro"]["total"] == 0.0
    assert groups["captions sample 1"]["aggregate"]["micro"]["miss"] == 1.0
    assert groups["captions sample 1"]["uncaptioned_ids"] == ["v1", "v2", "v3", "v4", "v5"]
    per_video = [json.loads(line) for line in (out / "per_video.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["sample"]) for r in per_video)[:2] == [("v0", 0), ("v0", 1)]
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "v0", "caption": "x", "sample": -1}])
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'sample' must be a non-negative"):
        load_captions(tmp_path / "bad.jsonl")


def _eval_exact(captions, gt, out) -> int:
    return cli.main(["eval", "--captions", str(captions), "--gt", str(gt), "--judge", "exact",
                     "--out", str(out)])


def test_nothing_scored_or_empty_captions_exit_non_zero(files, tmp_path, capsys):
    gt, _, clips = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _eval_exact(empty, gt, tmp_path / "e") == 2
    assert f"{empty}: holds no captions (empty file)" in capsys.readouterr().err
    # free-text captions of 2 of the 6 videos: the exact judge refuses both -> 0 scored, rc 1
    free = tmp_path / "free.jsonl"
    write_jsonl(free, [{"id": "v0", "caption": "Some shapes move around while beeps play."},
                       {"id": "v1", "caption": "A colourful animation with sounds."}])
    assert _eval_exact(free, gt, tmp_path / "f") == 1
    captured = capsys.readouterr()
    assert "captions: 0/2 captions scored (4 of 6 ground-truth videos have no caption)" in captured.out
    assert "2 FAILED" in captured.out and "no caption could be scored in captions" in captured.err
    report = (tmp_path / "f" / "report.md").read_text()
    assert "free-text caption: none of its 1 sentence(s) is in the synthetic grammar" in report


def test_untimed_events_are_checked_by_eval(files, tmp_path, capsys):
    gt, captions, _ = files
    null_time = tmp_path / "null.jsonl"
    write_jsonl(null_time, [{"id": "v0", "events": [{"time": None, "modality": "visual",
                                                     "subject": "the red circle", "action": "appears"}]}])
    assert _eval_exact(captions, null_time, tmp_path / "n") == 2
    assert (f"{null_time}:1: events[0]: event has no 'time' (or it is null) and no 'text'"
            in capsys.readouterr().err)
    # with a text it is an untimed free-text event: the exact judge refuses it by name
    write_jsonl(null_time, [{"id": "v0", "events": [{"time": None, "text": "A red circle appears."}]}])
    write_jsonl(tmp_path / "c.jsonl", [{"id": "v0", "caption": "At 0 s, the red circle appears."}])
    assert _eval_exact(tmp_path / "c.jsonl", null_time, tmp_path / "n") == 2
    assert "is not a synthetic event" in capsys.readouterr().err


def test_free_text_ground_truth_through_the_cli_with_the_embedding_judge(tmp_path):
    """Events as plain strings (the official test set's form), scored by the embedding judge."""
    import os
    import pathlib
    import subprocess
    import sys

    events = ["A man in a red shirt opens the front door.", "A dog barks twice.",
              "Heavy rain falls on the roof."]
    write_jsonl(tmp_path / "gt.jsonl", [{"id": "a", "events": events}, {"id": "b", "events": events},
                                        {"id": "c", "events": events[:1]}])
    write_jsonl(tmp_path / "cap.jsonl", [
        {"id": "a", "caption": " ".join(events)},
        {"id": "b", "caption": "A chef slices onions in a bright kitchen."}])
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "eval", "--captions",
                           str(tmp_path / "cap.jsonl"), "--gt", str(tmp_path / "gt.jsonl"),
                           "--judge", "embedding", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=scaled(600), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2/2 captions scored (1 of 3 ground-truth videos have no caption), 6 events" in done.stdout
    per_video = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "per_video.jsonl").open())}
    assert (per_video["a"]["missed"], per_video["a"]["hallucinated"]) == (0, 0)
    assert (per_video["b"]["missed"], per_video["b"]["hallucinated"]) == (3, 1)
