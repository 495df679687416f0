"""The demo report's "What the model perceives" section: per-kind % of ground-truth events captioned
correctly and the distinct-caption count, on hand-made clips (no model runs), and via --report-only.
"""

from __future__ import annotations

import json
import re

import pytest


def _event(time, subject, action):
    modality = "audio" if action == "sounds" else "visual"
    return {"time": time, "modality": modality, "subject": subject, "action": action,
            "text": f"At {time} s, {subject} {action}."}


ITEMS = [
    {"id": "test_000000", "events": [_event(0, "the red square", "appears"),
                                     _event(1, "the red square", "moves left"),
                                     _event(1, "a high beep", "sounds"),
                                     _event(2, "the red square", "vanishes")]},
    {"id": "test_000001", "events": [_event(0, "the blue circle", "appears"),
                                     _event(1, "the blue circle", "turns green"),
                                     _event(2, "a low beep", "sounds"),
                                     _event(3, "a high beep", "sounds")]},
    {"id": "test_000002", "events": [_event(1, "a low beep", "sounds")]},
]


def _captions(texts, stopped=True):
    return [{"id": it["id"], "caption": t, "stopped": stopped} for it, t in zip(ITEMS, texts, strict=True)]


def test_per_kind_correct_percentages_and_distinct_captions():
    from vsalmonn_jax.demo.perception import perception

    result = perception(ITEMS, _captions([
        # appears + sound correct; "moves right" at 2 s makes the vanish incorrect; "moves left" missed
        "At 0 s, the red square appears. At 1 s, a high beep sounds. At 2 s, the red square moves right.",
        # appears + turns correct; the 2 s sound is wrong (high vs low); the 3 s sound missed
        "At 0 s, the blue circle appears. At 1 s, the blue circle turns green. At 2 s, a high beep sounds.",
        "At 1 s, a low beep sounds.",
    ]))
    assert result["events"] == {"appears": 2, "vanishes": 1, "moves": 1, "turns": 1, "sounds": 4}
    assert result["correct"] == {"appears": 100.0, "vanishes": 0.0, "moves": 0.0, "turns": 100.0,
                                 "sounds": 50.0}
    assert result["correct_events"] == 5
    assert (result["distinct_captions"], result["clips"]) == (3, 3)


def test_the_same_caption_for_every_clip():
    from vsalmonn_jax.demo.perception import perception

    # a model ignoring the media: one caption everywhere; right only where it happens to match
    result = perception(ITEMS, _captions(["At 0 s, the red square appears. At 1 s, a low beep sounds."] * 3))
    assert result["distinct_captions"] == 1
    # clip 0: appears correct; its 1 s high beep becomes incorrect. clip 1: appears incorrect (blue
    # circle), no sound at 1 s. clip 2: the low beep correct.
    assert result["correct"] == {"appears": 50.0, "vanishes": 0.0, "moves": 0.0, "turns": 0.0,
                                 "sounds": 25.0}
    empty = perception(ITEMS, _captions([""] * 3))
    assert empty["distinct_captions"] == 1 and set(empty["correct"].values()) == {0.0}


def test_unstopped_captions_are_judged_like_the_stage_and_kinds_without_events_are_none():
    from vsalmonn_jax.demo.perception import perception

    twice = [{"id": "x", "events": [_event(0, "the red square", "appears")] * 2}]
    looping = "At 0 s, the red square appears. " * 6
    for stopped, correct in ((True, 2), (False, 1)):   # unstopped: runaway repeats collapsed first
        result = perception(twice, [{"id": "x", "caption": looping, "stopped": stopped}])
        assert result["correct_events"] == correct and result["correct"]["appears"] == 50.0 * correct
    sounds_only = perception(ITEMS[2:], [{"id": "test_000002", "caption": "", "stopped": True}])
    assert sounds_only["correct"]["appears"] is None and sounds_only["correct"]["sounds"] == 0.0
    with pytest.raises(ValueError, match="not in the items"):
        perception(ITEMS[:1], [{"id": "test_000009", "caption": "", "stopped": True}])


def _write_stage(run_dir, name, items, texts, captions=True, record=None):
    from vsalmonn_jax.demo.caption import score_captions

    folder = run_dir / "stages" / name
    folder.mkdir(parents=True)
    scored = score_captions(items, [(t, True) for t in texts])
    micro = scored["aggregate"]["micro"]
    micro.setdefault("incorrect_plus_hallucination", micro["incorrect"] + micro["hallucination"])
    (folder / "eval.json").write_text(json.dumps(record or {**scored, "qa": {"accuracy": 0.5}}))
    (folder / "done").write_text("")
    if captions:
        (folder / "captions.jsonl").write_text("".join(
            json.dumps({"id": it["id"], "caption": t, "stopped": True}) + "\n"
            for it, t in zip(items, texts, strict=True)))
    return json.loads((folder / "eval.json").read_text())


def test_report_section_skips_stages_without_captions_and_flags_wrong_ground_truth(tmp_path):
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.demo.report import write_report

    config = demo_config(True, None, ["--config.demo.bootstrap=20"])
    exact = [" ".join(e["text"] for e in it["events"]) for it in ITEMS]
    records = {"pretrain": _write_stage(tmp_path, "pretrain", ITEMS, [""] * 3, captions=False),
               "align": _write_stage(tmp_path, "align", ITEMS, ["At 1 s, a low beep sounds."] * 3),
               "sft": _write_stage(tmp_path, "sft", ITEMS, exact)}
    wrong = _write_stage(tmp_path, "mrdpo_1", ITEMS, [""] * 3)   # scored as all missed ...
    records["mrdpo_1"] = wrong
    (tmp_path / "stages" / "mrdpo_1" / "captions.jsonl").write_text("".join(   # ... captions exact
        json.dumps({"id": it["id"], "caption": t, "stopped": True}) + "\n" for it, t in zip(ITEMS, exact)))
    write_report(tmp_path, records, config, wall_s=1.0, items=ITEMS)
    report = (tmp_path / "report.md").read_text()
    section = report.split("## What the model perceives")[1].split("\n## ")[0]
    assert report.index("## Results per stage") < report.index("## What the model perceives")
    assert "| stage | appears % (n=2) | vanishes % (n=1) | moves % (n=1) | turns % (n=1) | " \
           "sounds % (n=4) | distinct captions |" in section
    assert "| align | 0.0 | 0.0 | 0.0 | 0.0 | 25.0 | 1 of 3 |" in section
    assert "| sft | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 3 of 3 |" in section
    assert not re.search(r"^\| (pretrain|mrdpo_1) \|", section, re.M)
    assert "- mrdpo_1: no row: its captions get 9 events right against the ground truth rebuilt " \
           "here, 0 in its eval.json" in section
    assert "a kind near 0 % is not perceived" in section
    data = json.loads((tmp_path / "report.json").read_text())["perception"]
    assert set(data) == {"align", "sft"} and data["align"]["distinct_captions"] == 1


@pytest.mark.parametrize("sft_learnt", [False, True])
def test_report_warns_when_no_stage_names_a_true_event(tmp_path, sft_learnt):
    """--quick's schedule is too short to caption: every stage missing every event gets a warning
    above the table; one stage naming one true event is enough to drop it."""
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.demo.report import write_report

    config = demo_config(True, None, ["--config.demo.bootstrap=20"])
    noise = ["At 9 s, the green star appears."] * 3
    records = {"pretrain": _write_stage(tmp_path, "pretrain", ITEMS, noise),
               "sft": _write_stage(tmp_path, "sft", ITEMS, ["At 1 s, a low beep sounds."] * 3
                                   if sft_learnt else noise)}
    write_report(tmp_path, records, config, wall_s=1.0, items=ITEMS)
    table = (tmp_path / "report.md").read_text().split("## Results per stage")[1].split("\n## ")[0]
    warned = "No stage names a single true event (Miss 100 % at every stage): " \
             f"{int(config.demo.pretrain_steps)} pretraining steps are too few" in table
    assert warned != sft_learnt


def test_report_only_rebuilds_the_ground_truth_from_the_config(tmp_path):
    from vsalmonn_jax.commands.demo import demo_config, main
    from vsalmonn_jax.demo.perception import ground_truth_items

    items = ground_truth_items(demo_config(False, None, []), 5)
    assert [it["id"] for it in items] == [f"test_{i:06d}" for i in range(5)]
    _write_stage(tmp_path, "sft", items, [it["exact"] for it in items])
    _write_stage(tmp_path, "mrdpo_1", items, [items[0]["exact"]] * 5)
    assert main(["--resume", str(tmp_path), "--report-only", "--config.demo.bootstrap=20"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"^\| sft \| 100\.0 \| (100\.0|-) \| (100\.0|-) \| (100\.0|-) \| (100\.0|-) \| 5 of 5 \|$",
                     report, re.M)
    assert re.search(r"^\| mrdpo_1 \| .* \| 1 of 5 \|$", report, re.M)
    assert "no row" not in report


def test_length_diagnostics_match_a_hand_count(tmp_path):
    """Sentences per caption vs true events per clip per stage, and chosen-shorter pairs per round,
    on hand-made stages (the counts below are by hand)."""
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.demo.report import write_report
    from vsalmonn_jax.training.pairs import length_stats

    config = demo_config(True, None, ["--config.demo.bootstrap=20"])
    exact = [" ".join(e["text"] for e in it["events"]) for it in ITEMS]   # 4 + 4 + 1 sentences
    records = {"sft": _write_stage(tmp_path, "sft", ITEMS, exact)}
    short = ["At 0 s, the red square appears. At 1 s, a low beep sounds.", "At 0 s, the blue circle appears.", ""]
    records["mrdpo_1"] = _write_stage(tmp_path, "mrdpo_1", ITEMS, short)   # 2 + 1 + 0 sentences
    pairs = [{"chosen": "A. B.", "rejected": "A. B. C."}, {"chosen": "A.", "rejected": "A. B. C. D."},
             {"chosen": "A. B. C.", "rejected": "A. B."}, {"chosen": "A.", "rejected": "B."}]
    records["mrdpo_1"]["stats"] = {"pairs": 4, **length_stats(pairs)}
    write_report(tmp_path, records, config, wall_s=1.0, items=ITEMS)
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Length diagnostics")[1].split("\n## ")[0]
    assert "| sft | 3.00 | 3.00 | 1.00 |" in section
    # 2 of 4 chosen shorter, 1 longer, 1 same; gaps -1, -3, +1, 0 -> mean -0.75
    assert "| mrdpo_1 | 1.00 | 3.00 | 0.33 | 4 | 2 (50 %) | 1 | 1 | -0.75 |" in section
    data = json.loads((tmp_path / "report.json").read_text())["length"]
    assert data["mrdpo_1"]["chosen_shorter_share"] == 0.5 and data["sft"]["sentences_per_caption"] == 3.0
    assert "mrdpo.max_length_gap = -1" in section


def _interval(miss, hall):
    rest = (0.0, -0.1, 0.1)
    return {"miss": miss, "hallucination": hall, "incorrect": rest, "total": rest}


@pytest.mark.parametrize("vs_sft, vs_control, expect", [
    (_interval((-0.1, -0.2, -0.05), (-0.1, -0.2, -0.05)),
     _interval((-0.1, -0.2, -0.01), (-0.1, -0.2, -0.05)), "REPRODUCED"),
    (_interval((0.2, 0.1, 0.3), (-0.5, -0.6, -0.4)),
     _interval((-0.1, -0.2, -0.01), (-0.1, -0.2, -0.05)), "NOT REPRODUCED"),
    (_interval((-0.1, -0.2, -0.05), (-0.1, -0.2, -0.05)),
     _interval((-0.1, -0.2, 0.01), (-0.1, -0.2, -0.05)), "UNDECIDED"),
    (_interval((-0.1, -0.2, -0.05), (-0.1, -0.2, -0.05)), None, "UNDECIDED"),
])
def test_preregistered_verdict(vs_sft, vs_control, expect):
    from vsalmonn_jax.demo.report import paper_claim, preregistered_verdict

    data = {"mrdpo_3 - sft": vs_sft, "mrdpo_1 - sft": _interval((1, 1, 1), (1, 1, 1))}
    if vs_control is not None:
        data["mrdpo_3 - control_3"] = vs_control
    assert preregistered_verdict(data)[0] == expect   # round 1 (higher) is not the last round
    assert paper_claim(data)[0].startswith(f"**Pre-registered verdict: {expect}**")


def test_perception_on_the_validation_split(tmp_path):
    """Per-kind perception read from stages/<name>/val.json against the val clips rebuilt from the
    config (issue 17: measure perception after pretraining on validation)."""
    from vsalmonn_jax.commands.demo import demo_config
    from vsalmonn_jax.demo.caption import score_captions
    from vsalmonn_jax.demo.perception import ground_truth_items, perception_section

    config = demo_config(True, None, ["--config.demo.n_val=6"])
    items = ground_truth_items(config, 6, "val")
    assert items[0]["id"] == "val_000000"
    texts = [it["exact"] for it in items[:3]] + [""] * 3     # half the clips exact, half empty
    records = {}
    for name, caps in (("pretrain", texts), ("sft", [it["exact"] for it in items])):
        folder = tmp_path / "stages" / name
        folder.mkdir(parents=True)
        val = {**score_captions(items, [(t, True) for t in caps]),
               "captions": [{"id": it["id"], "caption": t, "stopped": True} for it, t in zip(items, caps)]}
        (folder / "val.json").write_text(json.dumps(val))
        records[name] = {}
    lines, data = perception_section(tmp_path, records, config, split="val")
    assert lines[0] == "## What the model perceives (validation split)"
    assert data["sft"]["correct_events"] == sum(len(it["events"]) for it in items)
    assert data["pretrain"]["correct_events"] == sum(len(it["events"]) for it in items[:3])
    assert data["sft"]["distinct_captions"] == 6 and data["pretrain"]["distinct_captions"] == 4
    assert perception_section(tmp_path, records, config) == ([], {})   # no test captions.jsonl


def test_the_report_names_the_visual_kinds_left_out():
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.demo.report_settings import scene_kinds_text

    config = load_config("demo")
    config.data.synthetic.visual_kinds = ("appears", "vanishes", "moves", "turns")
    assert scene_kinds_text(config) == "Visual events in the scenes: appears, vanishes, moves, turns."
    config.data.synthetic.visual_kinds = ("appears", "turns")
    text = scene_kinds_text(config)
    assert text.startswith("Visual events in the scenes: appears, turns (vanishes and moves left out")
