"""Evaluation report directory: report.json, per_video.jsonl, report.md and matplotlib plots (Agg).

error_rates.png: micro Miss / Incorrect / Hallucination / Total per (model, stage, sample) group;
repetition.png: seq-rep-4, duplicate-sentence rate and no-end-token share per group.
"""

from __future__ import annotations

import json
import pathlib

from vsalmonn_jax.atomic_file import write_jsonl

RATE_KEYS = (("miss", "Miss"), ("incorrect", "Incorrect"), ("hallucination", "Hallucination"),
             ("total", "Total"))
REPETITION_KEYS = (("seq_rep_4", "seq-rep-4"), ("duplicate_sentence_rate", "duplicate sentences"),
                   ("no_end_token_rate", "no end token"))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary(result: dict) -> dict:
    """The JSON report: everything but the per-video scores."""
    return {"judge": result["judge"],
            "groups": [{k: v for k, v in g.items() if k != "scores"} for g in result["groups"]],
            **({"qa": result["qa"]} if "qa" in result else {})}


def markdown(result: dict) -> str:
    judge = result["judge"]
    lines = [f"# Caption evaluation ({judge['judge']} judge)", "",
             "Micro rates over all events (the paper's way); macro = per-video mean of Total; all in %.",
             "Hall (paper) = Incorrect + Hallucination. Judges differ by several points on the same "
             "captions: compare numbers from one judge only, never with published GPT-judged ones.", "",
             "| group | videos | scored | failed | events | Miss | Incorrect | Hallucination | Total "
             "| Hall (paper) | macro Total | seq-rep-4 | dup. sentences | no end token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in result["groups"]:
        agg, rep = g["aggregate"], g["repetition"]
        micro, macro = agg["micro"] or {}, agg["macro"] or {}
        lines.append(
            f"| {g['label']} | {agg['videos']} | {agg['scored']} | {agg['failed']} | {agg['events']} | "
            + " | ".join(_pct(micro.get(k)) for k, _ in RATE_KEYS)
            + f" | {_pct(micro.get('incorrect_plus_hallucination'))} | {_pct(macro.get('total'))} | "
            + f"{_pct(rep['seq_rep_4'])} | {_pct(rep['duplicate_sentence_rate'])} | "
            + f"{_pct(rep['no_end_token_rate'])} |")
    notes = []
    for g in result["groups"]:
        agg = g["aggregate"]
        if agg["failed"]:
            notes.append(f"- {g['label']}: {agg['failed']} video(s) the judge could not score "
                         f"(not counted in the rates): "
                         + "; ".join(f"`{i}`: {e}" for i, e in list(agg["failed_errors"].items())[:20]))
        if agg.get("partial_ids"):
            notes.append(f"- {g['label']}: {len(agg['partial_ids'])} video(s) scored from fewer judge "
                         "passes than asked (the others failed): "
                         + ", ".join(f"`{i}`" for i in agg["partial_ids"][:20]))
        if agg.get("unparsed_sentences"):
            notes.append(f"- {g['label']}: {agg['unparsed_sentences']} caption sentence(s) outside "
                         "the judge's grammar, counted as hallucinated.")
        if g["uncaptioned_ids"]:
            notes.append(f"- {g['label']}: {len(g['uncaptioned_ids'])} ground-truth video(s) without "
                         f"a caption: " + ", ".join(f"`{i}`" for i in g["uncaptioned_ids"][:20]))
        if g["collapsed_captions"]:
            notes.append(f"- {g['label']}: runaway repeats collapsed in {g['collapsed_captions']} "
                         "caption(s) without an end token before judging.")
    if notes:
        lines += ["", "## Notes", "", *notes]
    if "qa" in result:
        lines += ["", markdown_qa(result["qa"])]
    settings = {k: v for k, v in judge.items() if k != "stats"}
    lines += ["", "## Judge", "", "```json", json.dumps(settings, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def markdown_qa(qa: dict) -> str:
    lines = ["## Multiple-choice QA", "", "| group | questions | correct | accuracy % | unanswered | "
             "no prediction |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in qa.items():
        lines.append(f"| {label} | {r['n']} | {r['correct']} | {_pct(r['accuracy'])} | "
                     f"{len(r['unanswered_ids'])} | {len(r['missing_prediction_ids'])} |")
        for field, buckets in r["per_category"].items():
            for value, b in buckets.items():
                lines.append(f"| {label} ({field}={value}) | {b['n']} | {b['correct']} | "
                             f"{_pct(b['accuracy'])} | | |")
    return "\n".join(lines)


def _bar_plot(path: pathlib.Path, labels, series: dict[str, list[float]], title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 2), 3.6))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str | pathlib.Path, result: dict) -> dict[str, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "per_video.jsonl", "report.md",
                                           "error_rates.png", "repetition.png")}
    paths["report.json"].write_text(json.dumps(summary(result), indent=1, default=str) + "\n")
    write_jsonl(paths["per_video.jsonl"],
                ({"model": g["model"], "stage": g["stage"], "sample": g["sample"], **s.to_dict()}
                 for g in result["groups"] for s in g["scores"]), ensure_ascii=False)
    paths["report.md"].write_text(markdown(result))
    labels = [g["label"] for g in result["groups"]]
    micro = [g["aggregate"]["micro"] or {} for g in result["groups"]]
    _bar_plot(paths["error_rates.png"], labels,
              {name: [100 * m.get(k, 0.0) for m in micro] for k, name in RATE_KEYS},
              f"Caption errors ({result['judge']['judge']} judge, micro)", "% of ground-truth events")
    _bar_plot(paths["repetition.png"], labels,
              {name: [100 * g["repetition"][k] for g in result["groups"]] for k, name in REPETITION_KEYS},
              "Repetition", "%")
    return paths
