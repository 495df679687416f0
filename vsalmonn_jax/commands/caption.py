"""`vsalmonn-jax caption`: caption videos (files, folders, JSONL records) with a trained checkpoint.

  vsalmonn-jax caption VIDEO_OR_FOLDER_OR_JSONL... [--checkpoint RUN_OR_STAGE_DIR]
                       [--config configs/X.py | RUN/config.json] [--output captions.jsonl] [--prompt TEXT] [--num-samples N]
                       [--greedy | --top-p P --temperature T --top-k K] [--max-new-tokens N]
                       [--batch-size B] [--seed S] [--step STEP] [--tokenizer DIR] [--data-root DIR]
                       [--shard K/N] [--config.a.b=value ...]
Writes one JSON line per (video, sample): {"id", "video"|"audio", "sample", "caption", "stopped",
"num_tokens", "logprob"}. The model's config and tokenizer come from the run (its config.json and
tokenizer copy, found at or above --checkpoint); --config / --tokenizer / --config.a.b=v override
them. A `vsalmonn-jax demo` run directory captions with its final model (rebirth, else the last
mrDPO round); a stage folder (RUN/stages/<name>) with that stage. Running it again with the same --output resumes (finished lines are kept,
missing ones done). Unreadable media are reported on stderr and in <output>.errors.jsonl, and the
rest still finish; the exit status is then 1 (0 when every item was captioned). Two JSONL records
with the same id stop the command before the model is loaded (the error names both lines).
A set too large for one host: one job per host with `--shard K/N` (K = 0..N-1), each writing
captions-0000K-of-0000N.jsonl for --output captions.jsonl; the shards are disjoint and together
hold every item (a hash of the id picks the shard: give every job the same inputs), sampled with
the keys an unsharded run uses (launch/README.md, "Captioning on many hosts").
"""

from __future__ import annotations

import argparse
import os
import sys

from vsalmonn_jax.config import split_config_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsalmonn-jax caption", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="video / audio files, folders, or JSONL record files")
    p.add_argument("--checkpoint", default=None,
                   help="run workdir (with checkpoints/), an orbax checkpoints folder, or a demo "
                   "run / stage folder (none: the weights of config.model.pretrained alone, e.g. "
                   "the official release)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", default="captions.jsonl",
                   help="captions JSONL (default: captions.jsonl in the current folder); an "
                   "existing file is resumed")
    p.add_argument("--errors", default=None,
                   help="unreadable items JSONL (default: <output>.errors.jsonl)")
    p.add_argument("--prompt", default=None, help="default prompt (a record's own 'prompt' wins)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the config default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's repetition penalty, greedy too (default: generate.repetition_penalty, 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: config.generate.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows (item x sample) decoded together (default 8; a run with fewer rows "
                   "decodes that many, not 8 copies)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: config.seed)")
    p.add_argument("--tokenizer", default=None,
                   help="default: the run's tokenizer copy, else config.data.tokenizer")
    p.add_argument("--data-root", default=None, help="media root for JSONL records (default: "
                   "config.data.root, else each JSONL's folder)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="caption only shard K of N (0 <= K < N; items split by a hash of their id) "
                   "and add -0000K-of-0000N to the output and errors file names: one job per host "
                   "captions a set too large for one")
    p.add_argument("--no-progress", action="store_true")
    return p


def sampling_from_args(args, generate_cfg):
    """The SamplingConfig the flags ask for: --top-p/--temperature/--top-k imply sampling."""
    from vsalmonn_jax.generate.sampling import SamplingConfig

    base = SamplingConfig.from_config(generate_cfg)
    sampled = any(v is not None for v in (args.top_p, args.temperature, args.top_k))
    if args.greedy and sampled:
        raise ValueError("--greedy cannot be combined with --top-p / --top-k / --temperature")
    penalty = getattr(args, "repetition_penalty", None)
    return SamplingConfig(
        greedy=args.greedy or (base.greedy and not sampled),
        temperature=base.temperature if args.temperature is None else args.temperature,
        top_k=base.top_k if args.top_k is None else args.top_k,
        top_p=base.top_p if args.top_p is None else args.top_p,
        repetition_penalty=base.repetition_penalty if penalty is None else penalty)


def main(argv: list[str]) -> int:
    from vsalmonn_jax.generate.run_dir import resolve_config

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    import jax

    if jax.process_count() > 1:
        print(f"vsalmonn-jax caption: runs as one process per job; this run has "
              f"{jax.process_count()} processes. Start it without the multi-host launcher, one "
              "job per host with --shard K/N (the 7B model fits one host's devices)",
              file=sys.stderr)
        return 2
    from vsalmonn_jax.generate import caption_io

    output, errors_output, shard = args.output, args.errors, None
    if args.shard is not None:
        try:
            shard = caption_io.parse_shard(args.shard)
        except ValueError as err:
            print(f"vsalmonn-jax caption: {err}", file=sys.stderr)
            return 2
        output, errors_output = (path and caption_io.shard_output(path, *shard)
                                 for path in (output, errors_output))
    errors_output = errors_output or os.path.splitext(output)[0] + ".errors.jsonl"
    try:
        config, run_dir, source = resolve_config(args.checkpoint, config_path, overrides)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"vsalmonn-jax caption: {err}", file=sys.stderr)
        return 2
    if args.tokenizer:
        config.data.tokenizer = args.tokenizer
    if args.prompt:
        config.generate.prompt = args.prompt
    from vsalmonn_jax.models.pretrained import resolve_tokenizer

    resolve_tokenizer(config)
    if not config.data.tokenizer:
        print("vsalmonn-jax caption: no tokenizer (set --tokenizer, config.data.tokenizer or "
              "config.model.pretrained.tokenizer)",
              file=sys.stderr)
        return 2
    from vsalmonn_jax.config_check import check_for_cli

    if check_for_cli("vsalmonn-jax caption", config, needs_tokenizer=True):
        return 2
    try:
        sampling = sampling_from_args(args, config.generate)
    except ValueError as err:
        print(f"vsalmonn-jax caption: {err}", file=sys.stderr)
        return 2
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            print(f"vsalmonn-jax caption: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.num_samples < 1 or (args.num_samples > 1 and sampling.greedy):
        print("vsalmonn-jax caption: --num-samples > 1 needs sampling (greedy decoding would give "
              "identical samples); pass --top-p / --temperature", file=sys.stderr)
        return 2
    try:
        items, input_errors = caption_io.discover_items(
            args.inputs, args.data_root or config.data.root or None,
            own_track=config.data.get("video_audio", "track") == "record")
    except caption_io.InputError as err:
        print(f"vsalmonn-jax caption: {err}", file=sys.stderr)
        return 2
    for error in input_errors:
        print(f"caption: skipped input {error}", file=sys.stderr)
    if shard is not None:
        found, items = len(items), caption_io.shard_items(items, *shard)
        print(f"caption: shard {shard[0]}/{shard[1]}: {len(items)} of {found} items", file=sys.stderr)
        if not items:   # nothing to do: no model is loaded
            return 1 if input_errors else 0
    try:
        summary = caption_items(config, items, checkpoint=args.checkpoint, step=args.step,
                                sampling=sampling, num_samples=args.num_samples,
                                batch_size=args.batch_size, output=output,
                                errors_output=errors_output,
                                max_new_tokens=int(config.generate.max_new_tokens
                                                   if args.max_new_tokens is None else args.max_new_tokens),
                                seed=int(config.seed if args.seed is None else args.seed),
                                progress=not args.no_progress, run_dir=run_dir, source=source)
    except (FileNotFoundError, ValueError) as err:
        print(f"vsalmonn-jax caption: {err}", file=sys.stderr)
        return 2
    print(f"caption: {summary.written} written, {summary.already_done} already done, "
          f"{len(summary.failed)} unreadable, {len(input_errors)} bad inputs -> {output}",
          file=sys.stderr)
    if summary.failed:
        print(f"caption: unreadable items listed in {errors_output}", file=sys.stderr)
    return 1 if (summary.failed or input_errors) else 0


def caption_items(config, items, *, checkpoint, step, sampling, num_samples, batch_size, output,
                  errors_output, max_new_tokens, seed, progress, run_dir=None, source=""):
    """Load the model once, then run the resumable caption loop over `items`."""
    from vsalmonn_jax.generate.backend import open_backend
    from vsalmonn_jax.generate.caption_io import check_settings, input_settings
    from vsalmonn_jax.generate.caption_run import run_captions

    rows = max(1, min(int(batch_size), len(items) * int(num_samples)))   # one video: one row, not 8
    inputs = input_settings(config)
    check_settings(output, inputs, write=False)   # before a (7B) model load
    backend, what = open_backend(config, run_dir, checkpoint, step=step, sampling=sampling,
                                 max_new_tokens=max_new_tokens, batch_size=rows, seed=seed)
    print(f"caption: {what}; config {source or 'given'}; {len(items)} items x {num_samples} "
          f"samples, {sampling}; LLM weights decode in the "
          f"{getattr(backend, 'decode_layout', 'train')} layout (generate.decode_layout)",
          file=sys.stderr)
    from vsalmonn_jax.generate.generation_config import warn_unapplied

    warn_unapplied(config, sampling, "caption")

    check_settings(output, {"model": what, "prompt": str(config.generate.prompt),
                            "sampling": str(sampling), "max_new_tokens": int(max_new_tokens),
                            "seed": int(seed), **inputs})
    return run_captions(items, backend, output=output, errors_output=errors_output,
                        num_samples=num_samples, progress=progress)
