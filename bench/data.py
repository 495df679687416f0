"""Data throughput: clips/s through decode + features (SigLIP 384 pixels, 128-bin Whisper log-mel).

Ours: the grain loader with 2 worker processes (numpy/jax features, batches collated). Baseline,
the straightforward path of the official release: one process, the same PyAV decode, then the
transformers SiglipImageProcessor (PIL backend) and WhisperFeatureExtractor per clip. Same clips,
one run. Also printed: ours in-process (no workers).
Ends with `BENCH data_vs_hf <ours / HF clips per second>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_clips_per_second(records, settings) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import SiglipImageProcessorPil, WhisperFeatureExtractor

        image_processor = SiglipImageProcessorPil(size={"height": settings.image_size,
                                                        "width": settings.image_size})
    extractor = WhisperFeatureExtractor(feature_size=settings.num_mel_bins)
    from vsalmonn_jax.data.features import CHUNK_SAMPLES
    from vsalmonn_jax.data.media import load_media

    def one(record):
        media = load_media(record["video"], fps=settings.fps, max_frames=settings.max_frames)
        pixels = image_processor(list(media.frames), return_tensors="np")["pixel_values"]
        chunks = [media.audio[i:i + CHUNK_SAMPLES] for i in range(0, len(media.audio), CHUNK_SAMPLES)]
        mel = [extractor(c, sampling_rate=16000, return_tensors="np")["input_features"] for c in chunks]
        return pixels, mel

    one(records[0])                                   # warm-up (imports, torch init)
    start = time.perf_counter()
    for record in records:
        one(record)
    return len(records) / (time.perf_counter() - start)


def ours_clips_per_second(records, config, workers: int) -> float:
    from vsalmonn_jax.data.pipeline import make_loader

    loader = make_loader(records, config, shuffle=False, workers=workers, shard=(0, 1),
                         num_epochs=None)
    total = len(records)
    try:
        first = next(loader)                          # worker start-up and warm-up excluded
        done = first["example_id"].shape[0]
        start = time.perf_counter()
        counted = 0
        while done < total:
            batch = next(loader)
            done += batch["example_id"].shape[0]
            counted += batch["example_id"].shape[0]
        return counted / (time.perf_counter() - start)
    finally:
        loader.close()


def main() -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frame-size", type=int, default=64)
    args = parser.parse_args()

    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.data.example import FeatureSettings
    from vsalmonn_jax.data.records import load_records
    from vsalmonn_jax.data.synthetic import build_dataset, synthetic_config

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("7b", [f"data.tokenizer={tmp}/tokenizer", "data.batch_size=4",
                                    f"workdir={tmp}"])
        cfg = synthetic_config(config)
        cfg.frame_size = args.frame_size
        build_dataset(tmp, n_train=args.clips, n_val=0, n_test=0, cfg=cfg, workers=args.workers)
        records = load_records(os.path.join(tmp, "train.jsonl"))
        settings = FeatureSettings.from_config(config)
        print(f"clips: {len(records)} synthetic ({cfg.min_seconds}-{cfg.max_seconds} s, "
              f"{args.frame_size}x{args.frame_size}, 1 fps); features: SigLIP "
              f"{settings.image_size}px, {settings.num_mel_bins}-bin log-mel; cpus {os.cpu_count()}")
        hf = hf_clips_per_second(records, settings)
        print(f"hf (SiglipImageProcessorPil + WhisperFeatureExtractor, 1 process): {hf:.2f} clips/s")
        inline = ours_clips_per_second(records, config, workers=0)
        print(f"ours (numpy/jax features, in-process): {inline:.2f} clips/s")
        ours = ours_clips_per_second(records, config, workers=args.workers)
        print(f"ours (grain, {args.workers} workers): {ours:.2f} clips/s")
        print(f"BENCH data_inline_vs_hf {inline / hf:.3f}")
        print(f"BENCH data_vs_hf {ours / hf:.3f}")


if __name__ == "__main__":
    main()
