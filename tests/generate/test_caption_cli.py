"""`vsalmonn-jax caption` end to end on real synthetic .mp4 files (one corrupt) with a tiny checkpoint."""

import json
import pathlib

import jax
import numpy as np
import pytest

from vsalmonn_jax.data.encode import write_video

pytestmark = pytest.mark.xdist_group("caption_cli")   # one worker builds the module fixture once

CORPUS = ["Please describe the video in detail.", "At 1 s, a red square moves left.",
          "At 2 s, a low beep sounds.", "A blue circle appears and a high tone plays."] * 4


def _tone(freq, seconds, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def caption_setup(tmp_path_factory):
    """(root, config overrides, checkpoint dir, video paths, corrupt path)."""
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.data.tokenizer_build import build_tokenizer
    from vsalmonn_jax.training import state as st
    from vsalmonn_jax.training.av_task import build
    from vsalmonn_jax.training.checkpoint import Checkpointer
    from vsalmonn_jax.training.sharding import make_mesh

    root = tmp_path_factory.mktemp("caption")
    build_tokenizer(CORPUS, str(root / "tok"), vocab_size=300)
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        frames = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
        path = videos / f"clip{i}.mp4"
        write_video(path, frames, fps=1, audio=_tone(300 + 200 * i, 3.0))
        paths.append(str(path))
    corrupt = videos / "corrupt.mp4"
    corrupt.write_text("this is not a video\n" * 40)
    overrides = [f"--config.data.tokenizer={root / 'tok'}", "--config.mesh.data=2",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    config = load_config("tiny", overrides)
    task = build(config)
    tx, _ = st.make_optimizer(config.train, st.num_updates(config.train))
    mesh = make_mesh(dict(config.mesh))
    state, _ = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)))
    # a trained-looking LoRA (B != 0) so the checkpoint differs from a fresh init
    lora = jax.tree.map(lambda x: x + 0.05, state.trainable["lora"])
    state = state.replace(trainable={**state.trainable, "lora": lora}, step=state.step + 7)
    ckpt = Checkpointer(root / "run" / "checkpoints", async_save=False)
    ckpt.save(state, {"stage": "sft"})
    ckpt.close()
    return root, overrides, str(root / "run"), paths, str(corrupt), state


@pytest.mark.slow
def test_restore_for_inference_reads_the_checkpoint(caption_setup):
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.generate.model_load import restore_for_inference
    from vsalmonn_jax.training.av_task import build
    from vsalmonn_jax.training.sharding import make_mesh

    _, overrides, run, _, _, saved = caption_setup
    config = load_config("tiny", overrides)
    variables, info = restore_for_inference(config, build(config), make_mesh(dict(config.mesh)), run)
    assert info["step"] == 7 and info["checkpoint"].endswith("run/checkpoints")
    for name in ("lora", "adapter"):
        for a, b in zip(jax.tree.leaves(variables[name]), jax.tree.leaves(saved.trainable[name]),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the base is re-initialised from config.seed, exactly as training does
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_for_inference(config, build(config), make_mesh(dict(config.mesh)), run + "/nope")


@pytest.mark.slow
def test_caption_command_skips_corrupt_and_resumes(caption_setup, capsys):
    from vsalmonn_jax.commands.caption import main

    root, overrides, run, paths, corrupt, _ = caption_setup
    out = root / "out" / "captions.jsonl"
    argv = [str(pathlib.Path(paths[0]).parent), "--checkpoint", run, "--config", "tiny", *overrides,
            "--output", str(out), "--max-new-tokens", "5", "--batch-size", "4", "--no-progress",
            "--num-samples", "2", "--top-p", "0.9", "--temperature", "1.0"]
    assert main(argv) == 1                        # one item was unreadable
    err = capsys.readouterr().err
    assert f"caption: skipped {corrupt}: " in err
    assert "6 written, 0 already done, 1 unreadable" in err, err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["video"], r["sample"]) for r in lines) == sorted(
        (p, s) for p in paths for s in (0, 1))
    for r in lines:
        assert isinstance(r["caption"], str) and 1 <= r["num_tokens"] <= 5
        assert isinstance(r["stopped"], bool) and r["logprob"] <= 0.0
    errors = [json.loads(x) for x in (root / "out" / "captions.errors.jsonl").read_text().splitlines()]
    assert [e["video"] for e in errors] == [corrupt] and errors[0]["error"]
    # interrupted run: drop the last line, leave half a line; the rerun redoes exactly that row
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:-1]) + text[-1][:10])
    assert main(argv) == 1
    assert "1 written, 5 already done, 1 unreadable" in capsys.readouterr().err
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again == lines                         # same caption: per-(id, sample) keys
    # a resume with other settings would mix two runs in one file: refused, nothing written
    other = [a if a != "0.9" else "0.5" for a in argv]   # --top-p 0.5
    assert main(other) == 2
    assert "holds captions written with other settings (sampling: " in capsys.readouterr().err
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    saved = json.loads((root / "out" / "captions.jsonl.settings.json").read_text())
    assert saved["max_new_tokens"] == 5 and saved["data.max_frames"] == 110
    # so would other inputs (frames, audio channel: every caption changes): refused before a model
    # is loaded, naming the fields
    import vsalmonn_jax.generate.backend as backend_lib

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings check")

    real, backend_lib.open_backend = backend_lib.open_backend, no_load
    try:
        assert main([*argv, "--config.data.max_frames=2", "--config.data.audio_channel=mean"]) == 2
    finally:
        backend_lib.open_backend = real
    err = capsys.readouterr().err
    assert "data.max_frames: 110 -> 2" in err and "data.audio_channel: 'first' -> 'mean'" in err
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines


@pytest.mark.slow
def test_gathered_decode_weights_caption_as_the_training_layout(caption_setup, capsys):
    """generate.decode_layout=gathered (the LLM's weights gathered once over fsdp before decoding;
    `auto` picks it when a GPU / TPU has the memory) writes the captions the fsdp layout writes."""
    from vsalmonn_jax.commands.caption import main

    root, overrides, run, paths, _, _ = caption_setup
    rows = {}
    for layout in ("train", "gathered"):
        out = root / f"layout_{layout}.jsonl"
        argv = [*paths, "--checkpoint", run, "--config", "tiny", *overrides, "--output", str(out),
                "--max-new-tokens", "5", "--batch-size", "4", "--no-progress",
                f"--config.generate.decode_layout={layout}"]
        assert main(argv) == 0
        assert f"LLM weights decode in the {layout} layout" in capsys.readouterr().err
        rows[layout] = [json.loads(x) for x in out.read_text().splitlines()]
    for a, b in zip(rows["train"], rows["gathered"], strict=True):
        assert (a["id"], a["caption"], a["num_tokens"]) == (b["id"], b["caption"], b["num_tokens"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


@pytest.mark.slow
def test_caption_in_the_release_format_reads_a_video_without_audio(caption_setup, capsys):
    """The 7B presets' input format through `caption` (tiny model): a video without an audio
    track gets per-frame time tokens and the two-newline prompt; the output depends on the tokens."""
    from vsalmonn_jax.commands.caption import main

    root, overrides, run, _, _, _ = caption_setup
    silent = root / "silent"
    silent.mkdir()
    write_video(silent / "clip.mp4", np.random.default_rng(5).integers(0, 255, (3, 32, 32, 3),
                                                                         dtype=np.uint8), fps=1)
    release = ["--config.data.time_tokens=official", "--config.data.prompt_format=official",
               "--config.model.connector.interleave=official", "--config.data.audio_cut=video",
               "--config.data.frame_sampling=file"]
    results = {}
    for name, flags in (("release", release), ("no_time", release + ["--config.data.time_tokens=none"])):
        out = root / f"silent_{name}.jsonl"
        argv = [str(silent), "--checkpoint", run, "--config", "tiny", *overrides, *flags,
                "--output", str(out), "--max-new-tokens", "4", "--batch-size", "4", "--no-progress"]
        assert main(argv) == 0, capsys.readouterr().err
        (results[name],) = [json.loads(x) for x in out.read_text().splitlines()]
    assert 1 <= results["release"]["num_tokens"] <= 4
    assert results["release"]["logprob"] != pytest.approx(results["no_time"]["logprob"], abs=1e-6)


@pytest.mark.slow
def test_a_still_image_and_a_too_long_video_do_not_stop_the_run(caption_setup, capsys, monkeypatch):
    """Release format (time tokens): a still image (one frame, no duration) gets no time tokens,
    and an item whose prompt + new tokens would pass max_position_embeddings is skipped with the
    reason before decoding, its batch going on (both aborted the whole run, rerun included).
    Three items ask for three rows per batch, not eight."""
    from PIL import Image

    from vsalmonn_jax.commands.caption import main
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.data.example import Featurizer
    from vsalmonn_jax.generate import backend
    from vsalmonn_jax.generate.captioner import prompt_positions
    from vsalmonn_jax.training.av_task import build

    root, overrides, run, paths, _, _ = caption_setup
    folder = root / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(6)
    still, long = folder / "still.png", folder / "long.mp4"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(still)
    write_video(long, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), fps=1, audio=_tone(500, 8.0))
    release = ["--config.data.time_tokens=official"]
    config = load_config("tiny", overrides + release)
    featurizer, av = Featurizer.from_config(config), build(config).av_config
    need = {p: prompt_positions(featurizer({"id": p, "video": p, "kind": "caption"}), av)
            for p in (paths[0], str(long))}
    assert need[str(long)] > need[paths[0]]
    rows = []
    opened = backend.open_backend
    monkeypatch.setattr(backend, "open_backend", lambda *a, **k: rows.append(k["batch_size"]) or opened(*a, **k))
    out = root / "mixed.jsonl"
    argv = [paths[0], str(still), str(long), "--checkpoint", run, "--config", "tiny", *overrides,
            *release, f"--config.model.llm.max_position_embeddings={need[paths[0]] + 4}",
            "--output", str(out), "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 1   # one item skipped
    err = capsys.readouterr().err
    assert f"caption: skipped {long}: too long: its prompt takes up to {need[str(long)]} positions" in err
    lines = {json.loads(x)["video"]: json.loads(x) for x in out.read_text().splitlines()}
    assert set(lines) == {paths[0], str(still)} and all(r["num_tokens"] >= 1 for r in lines.values())
    assert rows == [3]


def test_batch_size_or_new_tokens_below_one_are_refused(caption_setup, capsys):
    """--batch-size -3 collected every item into one batch (nothing written until the end);
    --max-new-tokens 0 silently became the config's 1024."""
    from vsalmonn_jax.commands.caption import main

    root, overrides, run, paths, _, _ = caption_setup
    base = [paths[0], "--checkpoint", run, "--config", "tiny", *overrides, "--no-progress",
            "--output", str(root / "refused.jsonl")]
    for flag, value in (("--batch-size", "-3"), ("--max-new-tokens", "0")):
        assert main([*base, flag, value]) == 2
        assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err
    assert not (root / "refused.jsonl").exists()


def test_reading_the_saved_fields_logs_no_metadata_warning(tmp_path, caplog):
    """Every caption run printed `WARNING:absl:Metadata file does not exist` (orbax metadata read)."""
    import logging

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from vsalmonn_jax.generate.model_load import latest_step, saved_fields

    manager = ocp.CheckpointManager(tmp_path, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"trainable": {"a": jnp.ones((2,))}, "params": {"b": jnp.ones(3)}}),
        meta=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    with caplog.at_level(logging.WARNING):
        assert saved_fields(tmp_path, latest_step(tmp_path)) == ["params", "trainable"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_more_than_one_process_stops_with_a_message(monkeypatch, capsys, tmp_path):
    """One SPMD caption over several processes is not built (tokens would not be gathered and every
    process would append the same lines): a multi-process run stops at once, before any model or
    input is read, and points at one job per host with --shard."""
    from vsalmonn_jax.commands import caption

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert caption.main([str(tmp_path / "missing.mp4"), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "one process per job; this run has 2 processes" in err and "--shard K/N" in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_shards_split_the_items_and_each_line_is_the_unsharded_one(caption_setup, capsys,
                                                                     monkeypatch, tmp_path):
    """--shard K/N (one job per host): disjoint shards whose union is the unsharded output, line
    for line (per-item keys), an unreadable item in its own shard's errors file; bad values rc 2."""
    from vsalmonn_jax.commands.caption import main
    from vsalmonn_jax.generate.caption_io import shard_items

    root, overrides, run, paths, corrupt, _ = caption_setup
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "clips.jsonl"      # fixed ids: shard 0 = {clip1}, 1 = {clip0, clip2, corrupt}
    names = {f"clip{i}": pathlib.Path(p).name for i, p in enumerate(paths)}
    records.write_text("".join(json.dumps({"id": k, "video": v}) + "\n"
                               for k, v in {**names, "corrupt": pathlib.Path(corrupt).name}.items()))
    argv = [str(records), "--data-root", str(pathlib.Path(corrupt).parent), "--checkpoint", run,
            "--config", "tiny", *overrides, "--max-new-tokens", "3", "--batch-size", "4",
            "--no-progress", "--top-p", "0.9"]
    assert main(argv) == 1                                              # the corrupt file
    assert "3 written, 0 already done, 1 unreadable, 0 bad inputs" in capsys.readouterr().err
    whole = (tmp_path / "captions.jsonl").read_text().splitlines()
    lines = []
    for k, ids, rc in ((0, {"clip1"}, 0), (1, {"clip0", "clip2"}, 1)):
        assert main([*argv, "--shard", f"{k}/2"]) == rc
        assert f"caption: shard {k}/2: {len(ids) + k} of 4 items" in capsys.readouterr().err
        shard_lines = (tmp_path / f"captions-{k:05d}-of-00002.jsonl").read_text().splitlines()
        assert {json.loads(x)["id"] for x in shard_lines} == ids
        lines += shard_lines
    assert (tmp_path / "captions-00000-of-00002.errors.jsonl").read_text() == ""
    (error,) = (tmp_path / "captions-00001-of-00002.errors.jsonl").read_text().splitlines()
    assert json.loads(error)["id"] == "corrupt"
    got, want = (sorted(map(json.loads, x), key=lambda r: r["id"]) for x in (lines, whole))
    assert [{**r, "logprob": 0} for r in got] == [{**r, "logprob": 0} for r in want]
    np.testing.assert_allclose([r["logprob"] for r in got], [r["logprob"] for r in want], rtol=1e-5)
    ids = [{"id": i} for i in ("clip0", "clip1", "clip2", "corrupt")]
    empty = next(k for k in range(16) if not shard_items(ids, k, 16))
    assert main([*argv, "--shard", f"{empty}/16"]) == 0          # no item: stops before any model
    assert "0 of 4 items" in capsys.readouterr().err
    for bad_value in ("2/2", "x", "1/0", "-1/3"):
        assert main([*argv, f"--shard={bad_value}"]) == 2
        assert "--shard" in capsys.readouterr().err
