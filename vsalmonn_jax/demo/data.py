"""Demo data set-up: render the synthetic clips (train / fresh / test), decode them once, run the
frozen encoders once and keep their outputs per split (the encoder-output cache of decision 13).

Later stages never touch the .mp4 files again: they read `encoded/<split>.npz` (fp16 features),
standardised per dimension with the training split's statistics (demo/calibrate.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import multiprocessing
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vsalmonn_jax.data import synthetic
from vsalmonn_jax.data import synthetic_scene as scene_lib
from vsalmonn_jax.data.annotator import annotated_caption, default_annotator
from vsalmonn_jax.data.event_qa import event_qa_items, qa_corpus
from vsalmonn_jax.data.example import FeatureSettings, media_features
from vsalmonn_jax.data.features import siglip_normalize
from vsalmonn_jax.data.time_tokens import stack_time_tokens, time_token_fields, wants_time_tokens
from vsalmonn_jax.demo.calibrate import feature_stats, standardize

SPLITS = ("train", "val", "fresh", "test")
DATA_FORMAT = 3   # in data_key: 2 = the tokenizer also learned the event-QA wording (issue 17);
                  # 3 = the encoded splits carry video_seconds (time tokens)
TIME_SLOTS = 4    # time-token slots per frame: "8.0" is 3 tokens of the demo tokenizer


def split_sizes(demo: ml_collections.ConfigDict, rounds: int) -> dict[str, int]:
    """Clips per split (disjoint clip index spaces, synthetic_scene.SPLIT_BASE); mrDPO round r samples
    pairs on fresh clips [r * n_fresh, (r + 1) * n_fresh); val: every choice is read there."""
    return {"train": int(demo.n_train), "val": int(demo.get("n_val", 0)),
            "fresh": int(demo.n_fresh) * int(rounds), "test": int(demo.n_test)}


def tokenizer_corpus(config: ml_collections.ConfigDict) -> list[str]:
    """The demo tokenizer's training text: the synthetic grammar + chat roles, and the event-QA
    wording (data/event_qa.py). Setup and the data set build both use it (one tokenizer on disk)."""
    cfg = synthetic.synthetic_config(config)
    return synthetic.tokenizer_corpus(cfg, config.model.connector.placeholder_token) + qa_corpus(cfg)


def data_key(config: ml_collections.ConfigDict) -> str:
    """A hash of everything the rendered clips, the tokenizer and the encoded features depend on
    (data and model settings, the demo seed, split sizes): runs with the same key share one folder.
    Fields added later are left out at the value earlier runs had (defaults.LEGACY_VALUES), so
    their folders keep their keys."""
    from vsalmonn_jax.defaults import LEGACY_VALUES

    data = {k: v for k, v in config.data.to_dict().items()
            if LEGACY_VALUES.get(f"data.{k}", object()) != v}
    parts = {"format": DATA_FORMAT, "data": data, "model": config.model.to_dict(),
             "seed": int(config.demo.seed), "eval_batch": int(config.demo.eval_batch),
             "sizes": split_sizes(config.demo, int(config.mrdpo.rounds))}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def shared_data_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """<workdir>/demo-data/<data_key>: the default data folder, reused by every run with that key."""
    return pathlib.Path(config.workdir) / "demo-data" / data_key(config)


@contextlib.contextmanager
def data_lock(data_dir: pathlib.Path):
    """Hold an exclusive lock on the data folder while it is written (two demos sharing it wait for
    each other instead of rendering the same clips at once)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clip_items(seed: int, split: str, count: int, cfg: ml_collections.ConfigDict,
               annotator: ml_collections.ConfigDict | None = None) -> list[dict]:
    """Per clip: id, ground-truth events, exact and annotated (the SFT annotator of `annotator`,
    default data/annotator.py's realistic one) captions, QA items (data/event_qa.py: answered by
    option scoring)."""
    annotator = annotator or default_annotator()
    items = []
    for i in range(count):
        scene = scene_lib.make_scene(seed, synthetic.clip_index(split, i), cfg)
        items.append({"id": f"{split}_{i:06d}", "video": synthetic.clip_path(split, i),
                      "events": scene.events, "exact": scene_lib.reference_caption(scene),
                      "annotated": annotated_caption(scene, seed, annotator, cfg),
                      "qa": event_qa_items(scene, seed, int(cfg.qa_per_clip))})
    return items


def _featurize(args) -> dict[str, np.ndarray]:
    path, settings, cache_dir = args
    return media_features(path, None, settings, cache_dir)


def decode_split(data_dir: pathlib.Path, items: list[dict], settings: FeatureSettings,
                 max_frames: int, mel_frames: int, workers: int) -> dict[str, np.ndarray]:
    """Decode every clip (through the .npz media cache) into fixed-shape arrays:
    pixels uint8 [N, F, S, S, 3], frame_mask / frame_times [N, F], mel [N, 1, bins, mel_frames],
    audio_seconds / video_seconds [N]."""
    jobs = [(str(data_dir / it["video"]), settings, str(data_dir / "media_cache")) for it in items]
    if workers > 1 and len(jobs) > 8:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            decoded = list(pool.map(_featurize, jobs, chunksize=8))
    else:
        decoded = [_featurize(job) for job in jobs]
    return pack_clips(decoded, [it["video"] for it in items], settings, max_frames, mel_frames)


def pack_clips(decoded: list[dict], names: list[str], settings: FeatureSettings, max_frames: int,
               mel_frames: int) -> dict[str, np.ndarray]:
    """Decoded clips (media_features outputs) -> the fixed-shape arrays of decode_split; a clip
    with more frames or audio chunks than the demo model takes is a ValueError naming it."""
    n, s = len(decoded), settings.image_size
    out = {"pixels": np.zeros((n, max_frames, s, s, 3), np.uint8),
           "frame_mask": np.zeros((n, max_frames), bool),
           "frame_times": np.zeros((n, max_frames), np.float32),
           "mel": np.zeros((n, 1, settings.num_mel_bins, mel_frames), np.float32),
           "audio_seconds": np.zeros((n,), np.float32),
           "video_seconds": np.zeros((n,), np.float64)}
    for k, (name, media) in enumerate(zip(names, decoded, strict=True)):
        frames = media["pixels"].shape[0]
        if frames > max_frames or media["mel"].shape[0] != 1:
            raise ValueError(f"{name}: {frames} frames / {media['mel'].shape[0]} audio "
                             f"chunks; the demo model takes <= {max_frames} frames and 1 chunk")
        out["pixels"][k, :frames] = media["pixels"]
        out["frame_mask"][k, :frames] = True
        out["frame_times"][k, :frames] = media["frame_times"]
        out["mel"][k] = media["mel"][:, :, :mel_frames]
        out["audio_seconds"][k] = min(float(media["audio_seconds"]), mel_frames / 100.0)
        out["video_seconds"][k] = float(media["video_seconds"])
    return out


def add_time_tokens(media: dict[str, np.ndarray], tokenizer, mode: str) -> dict[str, np.ndarray]:
    """`media` plus per-frame time tokens when `data.time_tokens` (`mode`) gives video any:
    time_ids int32 / time_mask bool [N, F, TIME_SLOTS] (data/time_tokens.py, from video_seconds
    and the real frames) and time_with_audio bool [N] (whether a row keeps them when its audio is
    used too: "all" yes, "official" no; batches.media_batch applies it)."""
    if not wants_time_tokens(mode, True, False):
        return media
    n, f = media["frame_mask"].shape
    frames = media["frame_mask"].sum(1)
    fields = [time_token_fields(tokenizer, float(media["video_seconds"][k]), int(frames[k]))
              if frames[k] else None for k in range(n)]
    return {**media, **stack_time_tokens(fields, f, TIME_SLOTS),
            "time_with_audio": np.full((n,), wants_time_tokens(mode, True, True))}


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params: dict, pixels, mel):
    """Frozen towers on one batch -> (vision, audio) fp16 (compiled once per model and shape)."""
    media = model.apply({"params": params}, {"pixel_values": pixels, "mel": mel},
                        method="encode_frozen")
    return media["vision"].astype(jnp.float16), media["audio"].astype(jnp.float16)


def encode_split(model, params: dict, decoded: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Frozen SigLIP + Whisper once per clip -> vision fp16 [N, F, P, Hv], audio fp16 [N, 1, T, D]
    plus the masks connect() reads."""
    n = decoded["pixels"].shape[0]
    vision, audio = [], []
    for start in range(0, n, batch):
        rows = np.arange(start, start + batch) % n   # fixed batch shape: wrap the last batch
        pixels = siglip_normalize(decoded["pixels"][rows])
        v, a = jax.device_get(_encode(model, params, pixels, decoded["mel"][rows]))
        keep = min(batch, n - start)
        vision.append(v[:keep])
        audio.append(a[:keep])
    return {"vision": np.concatenate(vision), "audio": np.concatenate(audio),
            "frame_mask": decoded["frame_mask"], "frame_times": decoded["frame_times"],
            "audio_seconds": decoded["audio_seconds"], "video_seconds": decoded["video_seconds"]}


def prepare_data(data_dir: pathlib.Path, config: ml_collections.ConfigDict, model, params: dict,
                 log=print) -> dict[str, dict]:
    """Render + decode + encode every split once (existing outputs are reused), standardise the
    features with the train split's per-dimension statistics (demo.standardize_features). Returns
    {split: {"items": [...], "media": {...}}} and writes the tokenizer to data_dir/tokenizer."""
    demo = config.demo
    cfg = synthetic.synthetic_config(config)
    seed = int(demo.seed)
    sizes = split_sizes(demo, int(config.mrdpo.rounds))
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "meta.json").exists():
        log(f"[data] rendering {sizes['train']} train + {sizes['val']} val + {sizes['test']} test "
            "clips (.mp4 + AAC)")
        synthetic.build_dataset(str(data_dir), n_train=sizes["train"], n_val=sizes["val"],
                                n_test=sizes["test"],
                                seed=seed, cfg=cfg, placeholder=config.model.connector.placeholder_token,
                                vocab_size=int(config.model.llm.vocab_size),
                                workers=int(demo.render_workers), corpus=tokenizer_corpus(config))
    log(f"[data] rendering {sizes['fresh']} fresh clips for the mrDPO rounds")
    synthetic.render_split(str(data_dir), seed, "fresh", 0, sizes["fresh"], cfg,
                           int(demo.render_workers))
    settings = FeatureSettings.from_config(config)
    mel_frames = 2 * int(config.model.audio.max_source_positions)
    out = {}
    for split in (s for s in SPLITS if sizes[s] > 0):   # demo.n_val=0: no validation split
        items = clip_items(seed, split, sizes[split], cfg, demo.get("annotator"))
        path = data_dir / "encoded" / f"{split}.npz"
        if path.exists():
            with np.load(path) as f:
                media = {k: f[k] for k in f.files}
        else:
            log(f"[data] decoding + encoding {len(items)} {split} clips (once; cached)")
            decoded = decode_split(data_dir, items, settings, int(config.data.max_frames), mel_frames,
                                   int(demo.render_workers))
            media = encode_split(model, params, decoded, int(demo.eval_batch))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **media)
        out[split] = {"items": items, "media": media}
    if demo.get("standardize_features", True):   # the random towers' stand-in calibration
        stats = feature_stats(out["train"]["media"])
        for split in out.values():
            split["media"] = standardize(split["media"], stats)
    return out
