"""`vsalmonn-jax data synth|check`: build the synthetic data set, or validate + decode a JSONL file.

  data synth --out DIR --n N [--n-val K] [--n-test K] [--seed S] [--workers W] [--config C ...]
  data check FILE.jsonl [--root DIR] [--kind sft|preference|caption|mcq] [--config C ...]
`check` also encodes each record's text when --config.data.tokenizer is given; exit status 1 when a
record is invalid, a media / text fails, or the file holds no record at all (2: unreadable file).
"""

from __future__ import annotations

import argparse
import collections
import sys

from vsalmonn_jax.config import load_config, split_config_args
from vsalmonn_jax.config_check import check_for_cli
from vsalmonn_jax.data.example import FeatureSettings, Featurizer
from vsalmonn_jax.data.media import MediaError
from vsalmonn_jax.data.records import KINDS, RecordError, parse_jsonl
from vsalmonn_jax.data.synthetic import build_dataset, synthetic_config


def _config(config_path, overrides):
    return load_config(config_path or "tiny", overrides)


def synth(args, config) -> int:
    cfg = synthetic_config(config)
    info = build_dataset(args.out, n_train=args.n, n_val=args.n_val, n_test=args.n_test,
                         seed=args.seed, cfg=cfg,
                         placeholder=str(config.model.connector.placeholder_token),
                         vocab_size=int(config.model.llm.vocab_size), workers=args.workers)
    print(f"wrote {args.out}: splits {info['splits']}, seed {info['seed']}, "
          f"{len(info['vocabulary'])} actions; tokenizer in {args.out}/tokenizer")
    return 0


def check(args, config) -> int:
    try:
        records, errors = parse_jsonl(args.file, kind=args.kind, root=args.root or None)
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = FeatureSettings.from_config(config)
    kinds = collections.Counter(r["kind"] for r in records)
    failures, frames, seconds = [], [], []
    featurizer = Featurizer.from_config(config) if config.data.tokenizer else None
    for record in records:
        if featurizer is not None:   # the text must fit the template and data.max_length
            try:
                featurizer.text(record, has_media="video" in record or "audio" in record)
            except ValueError as err:
                failures.append(f"{record['source']}:{record['line']}: text: {err}")
        if args.no_decode or ("video" not in record and "audio" not in record):
            continue
        try:
            media = settings.load(record.get("video"), record.get("audio"))
        except MediaError as err:
            failures.append(f"{record['source']}:{record['line']}: {err.reason}: {err}")
            continue
        frames.append(media.frames.shape[0])
        seconds.append(media.audio_seconds)
    print(f"{args.file}: {len(records) + len(errors)} records, {len(records)} valid "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), {len(errors)} invalid, "
          f"{len(failures)} media/text failures")
    if frames:
        print(f"decoded {len(frames)}: frames {min(frames)}-{max(frames)}, audio "
              f"{min(seconds):.1f}-{max(seconds):.1f} s")
    for line in errors + failures:
        print(f"bad: {line}")
    if not records and not errors:
        print(f"bad: {args.file}: holds no records (empty file): nothing to train or evaluate on")
        return 1
    return 1 if errors or failures else 0


def main(argv: list[str]) -> int:
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="vsalmonn-jax data")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("synth", help="render the synthetic audio-visual data set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=None, help="training clips (default: config)")
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("check", help="validate a JSONL file and decode its media")
    p.add_argument("file")
    p.add_argument("--root", default="", help="data root for media paths (default: file's folder)")
    p.add_argument("--kind", choices=KINDS, default=None)
    p.add_argument("--no-decode", action="store_true")
    args = parser.parse_args(rest)
    config = _config(config_path, overrides)
    if check_for_cli("vsalmonn-jax data", config):
        return 2
    return synth(args, config) if args.action == "synth" else check(args, config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
