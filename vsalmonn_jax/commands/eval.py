"""`vsalmonn-jax eval`: score captions against ground-truth events and write a report directory.

  vsalmonn-jax eval --captions FILE [--captions FILE ...] --gt FILE --judge exact|embedding|llm --out DIR
                    [--thresholds calibration.json] [--qa-questions FILE --qa-predictions FILE]
                    [--config configs/X.py --config.eval.llm_model=...]
  vsalmonn-jax eval calibrate --captions FILE --gt FILE --labels FILE --out calibration.json
  vsalmonn-jax eval qa --questions FILE --predictions FILE [--predictions FILE ...] --out DIR
File formats: vsalmonn_jax/eval/records.py (ground-truth events may be free-text strings: embedding /
llm judges). Exit status: 0 scored; 1 the report is written but some group scored no caption (e.g.
free-text captions under the exact judge); 2 bad input (empty captions file, unknown ids, malformed
lines) or a judge that cannot be reached (connection refused / unknown host: stops in seconds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from vsalmonn_jax.config import load_config, split_config_args
from vsalmonn_jax.config_check import validate
from vsalmonn_jax.defaults import base_config
from vsalmonn_jax.eval.judge import JudgeUnavailable


def _config(config_path, overrides):
    if config_path:
        return load_config(config_path, overrides)
    config = base_config()
    if overrides:
        from vsalmonn_jax.config import apply_override

        for override in overrides:
            apply_override(config, override)
    return config


def _read_captions(paths):
    from vsalmonn_jax.eval.records import load_captions

    records = []
    for path in paths:
        found = load_captions(path)
        if not found:
            raise ValueError(f"{path}: holds no captions (empty file); nothing to score")
        records += found
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"caption for id {dup[2]!r} (model {dup[0]!r}, stage {dup[1]!r}, sample {dup[3]}) "
                         "appears in more than one --captions file")
    return records


def _make_judge(name, config, gt, thresholds):
    from vsalmonn_jax.eval.judge import get_judge

    options = {}
    if name == "exact":
        from vsalmonn_jax.eval.exact import build_vocabulary
        from vsalmonn_jax.eval.records import is_synthetic_event

        options["vocabulary"] = build_vocabulary(
            [[e for e in events if is_synthetic_event(e)] for events in gt.values()])
        options["free_text"] = "refuse"       # a free-text caption fails with the reason, unscored
    if thresholds:
        if name != "embedding":
            raise ValueError("--thresholds applies to the embedding judge only")
        options.update(json.loads(pathlib.Path(thresholds).read_text(encoding="utf-8"))["fitted"])
    return get_judge(name, config, **options)


def _qa_by_group(question_path, prediction_paths) -> dict:
    from vsalmonn_jax.eval.qa import load_questions, qa_accuracy
    from vsalmonn_jax.eval.records import iter_jsonl
    from vsalmonn_jax.eval.run import group_label

    questions = load_questions(question_path)
    groups: dict[str, dict[str, str]] = {}
    for path in prediction_paths:
        for lineno, obj in iter_jsonl(path):
            if "id" not in obj or not isinstance(obj.get("response"), str):
                raise ValueError(f"{path}:{lineno}: a prediction needs 'id' and a string 'response'")
            label = group_label(str(obj.get("model", "") or ""), str(obj.get("stage", "") or ""))
            bucket = groups.setdefault(label, {})
            if str(obj["id"]) in bucket:
                raise ValueError(f"{path}:{lineno}: duplicate prediction for id {obj['id']!r} in {label}")
            bucket[str(obj["id"])] = obj["response"]
    return {label: qa_accuracy(questions, preds) for label, preds in groups.items()}


def run_eval(args, config) -> int:
    from vsalmonn_jax.eval.records import load_gt
    from vsalmonn_jax.eval.report import write_report
    from vsalmonn_jax.eval.run import evaluate

    judge_name = args.judge or config.eval.judge
    if judge_name == "llm" and not config.eval.cache_dir:  # a rerun into the same --out costs nothing
        config.eval.cache_dir = str(pathlib.Path(args.out) / "llm_cache")
    gt = load_gt(args.gt)
    records = _read_captions(args.captions)
    judge = _make_judge(judge_name, config, gt, args.thresholds)
    result = evaluate(records, gt, judge)
    if args.qa_questions:
        if not args.qa_predictions:
            raise ValueError("--qa-questions needs --qa-predictions")
        result["qa"] = _qa_by_group(args.qa_questions, args.qa_predictions)
    paths = write_report(args.out, result)
    unscored = []
    for group in result["groups"]:
        agg, micro = group["aggregate"], group["aggregate"]["micro"] or {}
        rates = " ".join(f"{k}={100 * micro[k]:.1f}%" for k in ("miss", "incorrect", "hallucination", "total")
                         if k in micro)
        print(f"{group['label']}: {agg['scored']}/{agg['videos']} captions scored "
              f"({len(group['uncaptioned_ids'])} of {len(gt)} ground-truth videos have no caption), "
              f"{agg['events']} events"
              + (f", {rates}" if rates else "")
              + (f"; {agg['unparsed_sentences']} sentences outside the grammar counted as hallucinated"
                 if agg.get("unparsed_sentences") else "")
              + (f"; {agg['failed']} FAILED (listed in the report)" if agg["failed"] else ""))
        if not agg["scored"]:
            unscored.append(group["label"])
    print(f"report: {paths['report.md']}")
    if unscored:
        print(f"vsalmonn-jax eval: error: no caption could be scored in {', '.join(unscored)} "
              f"(reasons in {paths['report.md']})", file=sys.stderr)
        return 1
    return 0


def run_calibrate(args, config) -> int:
    from vsalmonn_jax.eval.calibrate import calibrate, load_labels
    from vsalmonn_jax.eval.judge import get_judge
    from vsalmonn_jax.eval.records import load_gt
    from vsalmonn_jax.eval.run import check_ids, judged_text

    gt = load_gt(args.gt)
    records = _read_captions(args.captions)
    check_ids(records, gt)
    labels, failed = load_labels(args.labels)
    used = [(r, labels[r.key]) for r in records if r.key in labels]
    unlabelled = [r.id for r in records if r.key not in labels]
    judge = get_judge("embedding", config)
    result = calibrate(judge, [(judged_text(r), gt[r.id]) for r, _ in used], [lab for _, lab in used])
    result.update(unlabelled_ids=unlabelled, failed_label_ids=failed, labels=str(args.labels))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    a, c = result["agreement"], result["current_agreement"]
    print(f"calibrated on {result['videos']} videos ({result['events']} events, {len(unlabelled)} without "
          f"labels, {len(failed)} failed labels skipped): {result['fitted']}")
    print(f"agreement: events {a['event_agreement']:.3f}, hallucination {a['hallucination_agreement']:.3f} "
          f"(current thresholds: {c['event_agreement']:.3f}, {c['hallucination_agreement']:.3f}) -> {out}")
    return 0


def run_qa(args, config) -> int:
    from vsalmonn_jax.eval.report import markdown_qa

    qa = _qa_by_group(args.questions, args.predictions)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qa.json").write_text(json.dumps(qa, indent=1) + "\n")
    (out / "qa.md").write_text(markdown_qa(qa) + "\n")
    for label, r in qa.items():
        print(f"{label}: accuracy {100 * r['accuracy']:.1f}% on {r['n']} questions "
              f"({len(r['unanswered_ids'])} unanswered, {len(r['missing_prediction_ids'])} without prediction)")
    return 0


def _parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"vsalmonn-jax eval{'' if mode == 'eval' else ' ' + mode}",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if mode == "qa":
        parser.add_argument("--questions", required=True)
        parser.add_argument("--predictions", required=True, action="append")
        parser.add_argument("--out", required=True)
        return parser
    parser.add_argument("--captions", required=True, action="append", help="captions JSONL (repeatable)")
    parser.add_argument("--gt", required=True, help="ground-truth events JSONL")
    if mode == "calibrate":
        parser.add_argument("--labels", required=True, help="labelled judgments JSONL")
        parser.add_argument("--out", required=True, help="calibration JSON to write")
        return parser
    parser.add_argument("--judge", choices=("exact", "embedding", "llm"), default=None,
                        help="default: config.eval.judge")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--thresholds", default=None, help="calibration JSON (embedding judge)")
    parser.add_argument("--qa-questions", default=None)
    parser.add_argument("--qa-predictions", default=None, action="append")
    return parser


def main(argv: list[str]) -> int:
    config_path, overrides, rest = split_config_args(list(argv))
    mode = rest[0] if rest and rest[0] in ("calibrate", "qa") else "eval"
    args = _parser(mode).parse_args(rest[1:] if mode != "eval" else rest)
    try:
        config = _config(config_path, overrides)
        validate(config)
        return {"eval": run_eval, "calibrate": run_calibrate, "qa": run_qa}[mode](args, config)
    except (ValueError, FileNotFoundError, KeyError, JudgeUnavailable) as err:  # RecordError: ValueError
        print(f"vsalmonn-jax eval: error: {err}", file=sys.stderr)
        return 2
