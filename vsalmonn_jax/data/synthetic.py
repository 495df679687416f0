"""The synthetic audio-visual data set on disk: real .mp4 clips, JSONL records per split, meta.json
(vocabulary for the exact judge) and a BPE tokenizer, all deterministic per seed.

Layout of `out_dir`:
  meta.json                       seed, generator config, vocabulary (action -> modality), subjects
  media/<split>/<split>_<i>.mp4   H.264 frames at 1 fps + AAC 16 kHz mono track
  <split>.jsonl                   caption records: video, events (ground truth), caption (exact)
  sft_<split>.jsonl               SFT conversations: biased captions (the annotator's habits) + QA
  sft_<split>_clean.jsonl         SFT conversations with the exact captions + QA
  qa_<split>.jsonl                multiple-choice QA records
  tokenizer/                      PreTrainedTokenizerFast (ChatML specials + media placeholder)
More clips of any split (e.g. "fresh" ones for each DPO round) come from `write_split`.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib

import ml_collections

from vsalmonn_jax.atomic_file import write_json, write_jsonl
from vsalmonn_jax.data import synthetic_scene as scene_lib
from vsalmonn_jax.data.encode import write_video
from vsalmonn_jax.data.event_grammar import render_event
from vsalmonn_jax.data.synthetic_render import render_audio, render_frames
from vsalmonn_jax.data.text import mcq_answer, mcq_prompt
from vsalmonn_jax.data.tokenizer_build import build_tokenizer

SYSTEM_PROMPT = "You are a helpful assistant."


def synthetic_config(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Generator defaults updated with `config.data.synthetic` when the run config has one."""
    cfg = scene_lib.default_config()
    section = None if config is None else config.get("data", {}).get("synthetic")
    if section is not None:
        cfg.update(section.to_dict() if hasattr(section, "to_dict") else dict(section))
    return cfg


def clip_index(split: str, i: int) -> int:
    return scene_lib.SPLIT_BASE[split] + int(i)


def clip_path(split: str, i: int) -> str:
    return f"media/{split}/{split}_{int(i):06d}.mp4"


def render_clip(seed: int, index: int, path: str, cfg: ml_collections.ConfigDict) -> scene_lib.Scene:
    """Write clip `index` of `seed` to `path` (.mp4 with audio); returns its scene."""
    scene = scene_lib.make_scene(seed, index, cfg)
    frames = render_frames(scene, cfg.frame_size, cfg.grid)
    audio = render_audio(scene, seed, cfg.sample_rate)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_video(path, frames, fps=cfg.fps, audio=audio, sample_rate=cfg.sample_rate)
    return scene


def clip_records(seed: int, split: str, i: int, cfg: ml_collections.ConfigDict) -> dict:
    """All JSONL records of one clip (no media written): caption, SFT (biased / clean), QA."""
    index = clip_index(split, i)
    scene = scene_lib.make_scene(seed, index, cfg)
    video, rid = clip_path(split, i), f"{split}_{int(i):06d}"
    user = f"{{placeholder}}\n{cfg.prompt}"
    caption = {"id": rid, "clip": index, "video": video, "seconds": scene.seconds,
               "prompt": cfg.prompt, "events": scene.events,
               "caption": scene_lib.reference_caption(scene)}
    qa, qa_turns = [], []
    for k, item in enumerate(scene_lib.qa_items(scene, seed, cfg)):
        qa.append({"id": f"{rid}_qa{k}", "clip": index, "video": video, **item})
        qa_turns.append({"id": f"{rid}_qa{k}", "video": video, "conversations": [
            {"role": "user", "content": "{placeholder}\n" + mcq_prompt(
                item["question"], item["options"])},
            {"role": "assistant", "content": mcq_answer(item["options"], item["answer"])}]})

    def sft(text: str) -> dict:
        return {"id": rid, "video": video, "conversations": [
            {"role": "user", "content": user}, {"role": "assistant", "content": text}]}

    return {"caption": caption, "qa": qa,
            "sft": [sft(scene_lib.biased_caption(scene, seed, cfg))] + qa_turns,
            "sft_clean": [sft(caption["caption"])] + qa_turns}


def tokenizer_corpus(cfg: ml_collections.ConfigDict, placeholder: str) -> list[str]:
    """Every sentence the grammar can produce at every second, the QA text and the chat roles."""
    corpus = [f"system\n{SYSTEM_PROMPT}", f"user\n{placeholder}\n{cfg.prompt}", "assistant\n"]
    visual = scene_lib.said_actions(cfg)
    for t in range(cfg.max_seconds + 1):
        for subject in scene_lib.subjects()["visual"]:
            corpus += [render_event({"time": t, "subject": subject, "action": a}) for a in visual]
        for subject in scene_lib.subjects()["audio"]:
            corpus.append(render_event({"time": t, "subject": subject, "action": "sounds"}))
    for i in range(200):   # QA wording, sampled from tokenizer-only clips (seed-independent)
        scene = scene_lib.make_scene(0, scene_lib.SPLIT_BASE["tokenizer"] + i, cfg)
        for item in scene_lib.qa_items(scene, 0, cfg):
            corpus.append(mcq_prompt(item["question"], item["options"]))
            corpus.append(mcq_answer(item["options"], item["answer"]))
    return corpus


def meta(seed: int, cfg: ml_collections.ConfigDict, counts: dict[str, int], placeholder: str) -> dict:
    return {"seed": int(seed), "config": cfg.to_dict(), "splits": counts,
            "vocabulary": scene_lib.vocabulary(int(cfg.grid), bool(cfg.places)), "subjects": scene_lib.subjects(),
            "grammar": "At {time} s, {subject} {action}.", "placeholder": placeholder,
            "system_prompt": SYSTEM_PROMPT, "split_base": scene_lib.SPLIT_BASE}


def load_meta(data_dir: str) -> dict:
    with open(pathlib.Path(data_dir) / "meta.json", encoding="utf-8") as f:
        return json.load(f)


def _render_job(args) -> None:
    seed, split, i, out_dir, cfg_dict = args
    cfg = ml_collections.ConfigDict(cfg_dict)
    path = os.path.join(out_dir, clip_path(split, i))
    if not os.path.exists(path):
        render_clip(seed, clip_index(split, i), path, cfg)


def render_split(out_dir: str, seed: int, split: str, start: int, count: int,
                 cfg: ml_collections.ConfigDict, workers: int = 1) -> None:
    """Write the .mp4 files of clips [start, start + count) of a split (existing files are kept)."""
    jobs = [(seed, split, i, str(out_dir), cfg.to_dict()) for i in range(start, start + count)]
    if workers <= 1:
        for job in jobs:
            _render_job(job)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_render_job, jobs, chunksize=16))


def write_split(out_dir: str, split: str, start: int, count: int, *, seed: int,
                cfg: ml_collections.ConfigDict, placeholder: str = "<media>", workers: int = 1,
                suffix: str = "") -> dict[str, str]:
    """Render clips [start, start + count) of `split` and write its JSONL files.

    Files: <split><suffix>.jsonl (caption records), qa_, sft_ and sft_..._clean variants.
    Clips are unlimited per split (e.g. "fresh" clips for each DPO round); returns {kind: path}.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    render_split(str(out), seed, split, start, count, cfg, workers)
    rows = [clip_records(seed, split, i, cfg) for i in range(start, start + count)]
    fill = lambda r: json.loads(json.dumps(r).replace("{placeholder}", placeholder))
    name = f"{split}{suffix}"
    paths = {"caption": out / f"{name}.jsonl", "qa": out / f"qa_{name}.jsonl",
             "sft": out / f"sft_{name}.jsonl", "sft_clean": out / f"sft_{name}_clean.jsonl"}
    write_jsonl(paths["caption"], [r["caption"] for r in rows])
    write_jsonl(paths["qa"], [q for r in rows for q in r["qa"]])
    write_jsonl(paths["sft"], [fill(s) for r in rows for s in r["sft"]])
    write_jsonl(paths["sft_clean"], [fill(s) for r in rows for s in r["sft_clean"]])
    return {kind: str(path) for kind, path in paths.items()}


def build_dataset(out_dir: str, n_train: int | None = None, n_val: int | None = None,
                  n_test: int | None = None, seed: int | None = None,
                  cfg: ml_collections.ConfigDict | None = None, placeholder: str = "<media>",
                  vocab_size: int = 512, workers: int = 1, corpus: list[str] | None = None) -> dict:
    """Render the clips, write every JSONL, meta.json and the tokenizer (trained on `corpus`,
    default `tokenizer_corpus`); returns the meta dict."""
    cfg = cfg or scene_lib.default_config()
    seed = cfg.seed if seed is None else seed
    counts = {"train": cfg.n_train if n_train is None else n_train,
              "val": cfg.n_val if n_val is None else n_val,
              "test": cfg.n_test if n_test is None else n_test}
    out = pathlib.Path(out_dir)
    for split, count in counts.items():
        write_split(str(out), split, 0, count, seed=seed, cfg=cfg, placeholder=placeholder,
                    workers=workers)
    build_tokenizer(tokenizer_corpus(cfg, placeholder) if corpus is None else corpus,
                    str(out / "tokenizer"), vocab_size, placeholder)
    info = meta(seed, cfg, counts, placeholder)
    write_json(out / "meta.json", info, indent=1)
    return info
