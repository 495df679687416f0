"""Synthetic data set: determinism, exact ground truth vs biased SFT captions, media that shows the
events (shapes at their cells and colours, sounds at their seconds), files on disk, tokenizer."""

import collections
import json

import numpy as np
import pytest

from vsalmonn_jax.data import synthetic_scene as sc
from vsalmonn_jax.data.event_grammar import event_key, parse_caption
from vsalmonn_jax.data.media import load_media
from vsalmonn_jax.data.synthetic_render import RGB, render_audio, render_frames


def test_clip_is_a_pure_function_of_seed_and_index():
    a, b = sc.make_scene(3, 17), sc.make_scene(3, 17)
    assert a.events == b.events and a.sounds == b.sounds
    np.testing.assert_array_equal(render_frames(a), render_frames(b))
    np.testing.assert_array_equal(render_audio(a, 3), render_audio(b, 3))
    assert sc.make_scene(3, 18).events != a.events or sc.make_scene(4, 17).events != a.events
    assert sc.biased_caption(a, 3) == sc.biased_caption(b, 3)
    assert sc.qa_items(a, 3) == sc.qa_items(b, 3)


def test_reference_caption_parses_back_to_the_exact_events():
    vocab = sc.vocabulary()
    for i in range(200):
        scene = sc.make_scene(0, i)
        assert 4 <= scene.seconds <= 8 and scene.events
        events, unparsed = parse_caption(sc.reference_caption(scene), vocab)
        assert not unparsed
        assert [event_key(e) for e in events] == [event_key(e) for e in scene.events]
        assert all(e["text"] == f"At {e['time']} s, {e['subject']} {e['action']}." for e in scene.events)
        assert all(0 <= e["time"] < scene.seconds for e in scene.events)


def test_biased_captions_have_the_configured_habits():
    cfg = sc.default_config()
    true_sounds = kept_sounds = false_sounds = visual = repeats = 0
    for i in range(400):
        scene = sc.make_scene(0, i, cfg)
        gt = {event_key(e) for e in scene.events}
        written = sc.biased_events(scene, 0, cfg)
        true_sounds += sum(e["modality"] == "audio" for e in scene.events)
        kept_sounds += sum(e["modality"] == "audio" and event_key(e) in gt for e in set_of(written))
        visual += sum(e["modality"] == "visual" for e in scene.events)
        fake = [e for e in written if event_key(e) not in gt]
        assert all(e["subject"] == "a low beep" and e["action"] == "sounds" for e in fake)
        visual_times = {e["time"] for e in scene.events if e["modality"] == "visual"}
        assert all(e["time"] in visual_times for e in fake)          # heard at visual events
        false_sounds += len(fake)
        repeats += len(written) != len(set_of(written))
        assert [e for e in written if e["modality"] == "visual"] != [] or not visual_times
    assert 0.2 < kept_sounds / true_sounds < 0.4                     # sound_drop 0.7
    assert 0.2 < false_sounds / visual < 0.5                         # false low beeps
    assert 0.2 < repeats / 400 < 0.4                                 # repeat_prob 0.3
    cfg.bias.enabled = False
    scene = sc.make_scene(0, 1, cfg)
    assert sc.biased_events(scene, 0, cfg) == scene.events


def set_of(events):
    seen, out = set(), []
    for e in events:
        if event_key(e) not in seen:
            seen.add(event_key(e))
            out.append(e)
    return out


def test_qa_items_are_answerable_from_the_scene():
    for i in range(50):
        scene = sc.make_scene(1, i)
        for item in sc.qa_items(scene, 1):
            answer = item["options"][item["answer"]]
            assert len(item["options"]) == len(set(item["options"])) >= 2
            if item["question"].startswith("What sound"):
                t = int(item["question"].split()[-2])
                assert (t, answer) in scene.sounds
            elif item["question"].startswith("How many"):
                assert answer == str(len(scene.sounds))


def test_frames_show_shapes_at_their_cells_and_colours():
    scene = sc.make_scene(5, 3)
    frames = render_frames(scene, 64, 4)
    for track in scene.tracks:
        for t in range(scene.seconds):
            cx, cy = ((track.cell[t] + 0.5) * 64 / 4).astype(int)
            pixel = tuple(int(v) for v in frames[t, cy, cx])
            if track.visible[t]:
                assert pixel == RGB[track.colour[t]]


def test_sounds_are_loud_only_at_their_seconds():
    scene = next(s for s in (sc.make_scene(2, i) for i in range(50)) if s.sounds)
    audio = render_audio(scene, 2)
    rms = [np.sqrt((audio[t * 16000:(t + 1) * 16000] ** 2).mean()) for t in range(scene.seconds)]
    loud = {t for t, _ in scene.sounds}
    for t, value in enumerate(rms):
        assert (value > 0.05) == (t in loud)


def test_dataset_on_disk(synth_dir):
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert meta["splits"] == {"train": 12, "val": 2, "test": 2} and meta["seed"] == 7
    assert meta["vocabulary"]["sounds"] == {"modality": "audio"}
    assert meta["vocabulary"]["moves left"] == {"modality": "visual"}
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    first = rows[0]
    scene = sc.make_scene(7, first["clip"])
    assert first["events"] == scene.events and first["caption"] == sc.reference_caption(scene)
    media = load_media(str(synth_dir / first["video"]))
    assert media.frames.shape == (scene.seconds, 64, 64, 3) and media.has_audio
    np.testing.assert_allclose(media.frame_times, np.arange(scene.seconds))
    assert media.audio_seconds == pytest.approx(scene.seconds, abs=0.01)
    # decoded (H.264) frames keep each shape's colour at its cell
    ref = render_frames(scene)
    assert np.abs(media.frames.astype(int) - ref.astype(int)).mean() < 4
    sft = [json.loads(line) for line in (synth_dir / "sft_train.jsonl").read_text().splitlines()]
    clean = [json.loads(line) for line in (synth_dir / "sft_train_clean.jsonl").read_text().splitlines()]
    assert len(sft) == len(clean) > 12
    assert sft[0]["conversations"][0]["content"].startswith("<media>\n")
    assert clean[0]["conversations"][1]["content"] == first["caption"]
    assert sft[0]["conversations"][1]["content"] == sc.biased_caption(scene, 7)
    qa = [json.loads(line) for line in (synth_dir / "qa_test.jsonl").read_text().splitlines()]
    assert qa and all(0 <= q["answer"] < len(q["options"]) for q in qa)
    val = [json.loads(line) for line in (synth_dir / "val.jsonl").read_text().splitlines()]
    assert {r["clip"] for r in val}.isdisjoint({r["clip"] for r in rows})


def test_tokenizer_loads_offline_and_covers_the_grammar(synth_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(synth_dir / "tokenizer"), local_files_only=True)
    assert len(tok) <= 512
    sentence = "At 7 s, the yellow triangle turns blue."
    ids = tok.encode(sentence, add_special_tokens=False)
    assert tok.decode(ids) == sentence and len(ids) <= 12
    chat = tok.apply_chat_template([{"role": "user", "content": "<media>\nhi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\n<media>\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_fresh_clips_extend_without_touching_the_splits(synth_dir, tmp_path):
    from vsalmonn_jax.data.synthetic import synthetic_config, write_split

    cfg = synthetic_config()
    paths = write_split(str(tmp_path), "fresh", 5, 2, seed=7, cfg=cfg, suffix="_r1")
    rows = [json.loads(line) for line in open(paths["caption"])]
    assert [r["id"] for r in rows] == ["fresh_000005", "fresh_000006"]
    assert rows[0]["clip"] == sc.SPLIT_BASE["fresh"] + 5
    assert rows[0]["events"] == sc.make_scene(7, sc.SPLIT_BASE["fresh"] + 5, cfg).events
    assert (tmp_path / rows[1]["video"]).stat().st_size > 0
    assert paths["sft"].endswith("sft_fresh_r1.jsonl")


def test_sounds_are_separable_in_a_16_bin_log_mel():
    """Nearest-centroid on the half second of log-mel after each sound start: every class of
    sound (pitch, chirp direction, noise) is told apart, so the audio events are learnable."""
    from vsalmonn_jax.data.features import log_mel

    windows, labels = [], []
    for i in range(60):
        scene = sc.make_scene(11, i)
        if not scene.sounds:
            continue
        mel = log_mel(render_audio(scene, 11), 16)                    # [16, 3000], 100 frames/s
        for t, name in scene.sounds:
            start = int(round((t + 0.05) * 100))
            windows.append(mel[:, start:start + 50].reshape(-1))
            labels.append(sc.SOUNDS.index(name))
    windows, labels = np.stack(windows), np.asarray(labels)
    half = len(labels) // 2
    centroids = np.stack([windows[:half][labels[:half] == k].mean(0) for k in range(len(sc.SOUNDS))])
    distance = ((windows[half:, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = (distance.argmin(1) == labels[half:]).mean()
    assert len(labels) > 60 and accuracy >= 0.95


def test_places_grammar_says_where_shapes_appear_and_move_to():
    """`places`: "appears at the <cell>" / "moves to the <cell>" name the shape's cell in the scene's
    tracks at that second; the rest of the caption, and the scene itself, are as without it."""
    cfg = sc.default_config()
    cfg.update(dict(grid=3, places=True))
    plain_cfg = sc.default_config()
    plain_cfg.grid = 3
    vocab = sc.vocabulary(3, places=True)
    assert sc.cell_name((0, 0), 3) == "top left" and sc.cell_name((1, 1), 3) == "centre"
    assert sc.cell_name((2, 1), 3) == "middle right" and sc.cell_name((3, 0), 4) == "row 1 column 4"
    assert len({sc.cell_name((c, r), 3) for c in range(3) for r in range(3)}) == 9
    said = 0
    for i in range(100):
        scene, plain = sc.make_scene(0, i, cfg), sc.make_scene(0, i, plain_cfg)
        assert [(e["time"], e["subject"]) for e in scene.events] == \
            [(e["time"], e["subject"]) for e in plain.events]
        events, unparsed = parse_caption(sc.reference_caption(scene), vocab)
        assert not unparsed and [event_key(e) for e in events] == [event_key(e) for e in scene.events]
        for event, before in zip(scene.events, plain.events, strict=True):
            kind = before["action"].split()[0]
            if kind not in ("appears", "moves"):
                assert event["action"] == before["action"]
                continue
            track = next(tr for tr in scene.tracks if event["subject"].endswith(" " + tr.shape))
            cell = sc.cell_name(track.cell[event["time"]], 3)
            word = "at" if kind == "appears" else "to"
            assert event["action"] == f"{kind} {word} the {cell}" and event["action"] in sc.said_actions(cfg)
            said += 1
    assert said > 150
    assert sc.said_actions(plain_cfg) == sc.VISUAL_ACTIONS


def test_places_grammar_reaches_qa_annotator_and_tokenizer():
    """Which-shape-appears questions still exist, false events use the grammar's actions, and the
    tokenizer corpus holds every sentence of it."""
    from vsalmonn_jax.data.annotator import annotated_events, default_annotator
    from vsalmonn_jax.data.synthetic import tokenizer_corpus

    cfg = sc.default_config()
    cfg.update(dict(grid=3, places=True))
    annotator = default_annotator()
    annotator.false_rate = 0.5
    actions = set(sc.said_actions(cfg))
    appears_questions, false_visual = 0, 0
    for i in range(60):
        scene = sc.make_scene(0, i, cfg)
        appears_questions += sum(q["question"].startswith("Which shape appears") for q in sc.qa_items(scene, 0, cfg))
        truth = {event_key(e) for e in scene.events}
        for event in annotated_events(scene, 0, annotator, cfg):
            if event["modality"] == "visual" and event_key(event) not in truth:
                false_visual += 1
                assert event["action"] in actions
    assert appears_questions > 10 and false_visual > 10
    corpus = set(tokenizer_corpus(cfg, "<image>"))
    assert "At 3 s, the red circle moves to the bottom right." in corpus
    assert "At 0 s, the blue cross appears at the centre." in corpus


def test_visual_kinds_limit_the_scenes_events():
    """Scenes drawn with visual_kinds=(appears, turns) hold only those visual kinds (and every shape
    still appears first); all four kinds give the default scenes event for event."""
    cfg = sc.default_config()
    cfg.visual_kinds = ("appears", "turns")
    kinds = collections.Counter(e["action"].split()[0] for i in range(100)
                                for e in sc.make_scene(3, i, cfg).events if e["modality"] == "visual")
    assert set(kinds) == {"appears", "turns"} and kinds["turns"] > 50
    cfg.visual_kinds = sc.VISUAL_KINDS
    assert all(sc.make_scene(3, i, cfg).events == sc.make_scene(3, i).events for i in range(30))
    cfg.visual_kinds = ("turns",)
    with pytest.raises(ValueError, match="appears among them"):
        sc.make_scene(3, 0, cfg)
