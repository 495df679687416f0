"""mrDPO preference pairs: rank a video's k sampled captions by their judged errors, pick pairs.

Pure Python (no jax): samples + VideoScores in, JSON-able preference records out (the data pipeline's
"preference" kind: prompt, chosen, rejected, gt, plus the media path), with per-round statistics.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

PAIR_RULES = ("total", "miss_weighted", "dominance")
PAIR_MODES = ("best_worst", "all")
MEDIA_FIELDS = ("video", "audio")


@dataclasses.dataclass
class Sample:
    """One generated caption: text (special tokens removed), whether it ended with a stop token,
    number of generated tokens and its summed log-probability under the sampling policy."""

    text: str
    stopped: bool = True
    num_tokens: int = 0
    logprob: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairRule:
    """How samples are ranked and paired (config section `mrdpo`).

    rule: "total"         error = missed + incorrect + hallucinated (the default; the paper's ranking)
          "miss_weighted" error = miss_weight * missed + incorrect + hallucinated (counters the
                          "say less" drift whole-caption preferences learn)
          "dominance"     the chosen sample must be no worse on each of missed, incorrect and
                          hallucinated and better in total: no pair ever prefers a caption that
                          misses more (or invents more) than the one it beats
    mode: "best_worst"    one pair per video: the lowest-error vs the highest-error sample (for
                          "dominance": the accepted pair with the largest total-error margin)
          "all"           every ordered pair of samples with different errors
    drop_ties: a pair whose errors tie is dropped; with False, ties are broken by fewer
               hallucinations, then fewer incorrect events (still dropped when those tie too).
    min_margin: the rejected sample's error must exceed the chosen one's by more than this.
    max_length_gap: NOT in the paper. >= 0: a pair's captions differ by at most this many sentences
               (a length-controlled rule against "the shorter caption wins"); best_worst then takes
               the accepted pair with the largest error margin. -1: off.
    """

    rule: str = "total"
    miss_weight: float = 2.0
    mode: str = "best_worst"
    drop_ties: bool = True
    min_margin: float = 0.0
    max_length_gap: int = -1

    def __post_init__(self):
        if self.rule not in PAIR_RULES:
            raise ValueError(f"mrdpo.pair_rule must be one of {PAIR_RULES}, got {self.rule!r}")
        if self.mode not in PAIR_MODES:
            raise ValueError(f"mrdpo.pair_mode must be one of {PAIR_MODES}, got {self.mode!r}")

    @classmethod
    def from_config(cls, config) -> PairRule:
        """From the full config (its `mrdpo` section) or the section itself."""
        section = config["mrdpo"] if "mrdpo" in config else config
        return cls(rule=str(section["pair_rule"]), miss_weight=float(section.get("miss_weight", 2.0)),
                   mode=str(section.get("pair_mode", "best_worst")),
                   drop_ties=bool(section.get("drop_ties", True)),
                   min_margin=float(section.get("min_margin", 0.0)),
                   max_length_gap=int(section.get("max_length_gap", -1)))

    def error(self, score) -> float:
        """The ranking key of one VideoScore (lower is better)."""
        weight = self.miss_weight if self.rule == "miss_weighted" else 1.0
        return weight * float(score.missed) + float(score.incorrect) + float(score.hallucinated)

    def key(self, score) -> tuple[float, ...]:
        """Full ranking key: the error, then (unless drop_ties) the tie breakers."""
        if self.drop_ties:
            return (self.error(score),)
        return (self.error(score), float(score.hallucinated), float(score.incorrect))

    def prefers(self, better, worse) -> bool:
        """Whether `better` (a VideoScore) beats `worse` by the rule (strictly, beyond min_margin)."""
        if self.rule == "dominance":
            counts = ("missed", "incorrect", "hallucinated")
            return (all(float(getattr(better, c)) <= float(getattr(worse, c)) for c in counts)
                    and self.error(worse) - self.error(better) > self.min_margin)
        kb, kw = self.key(better), self.key(worse)
        if kw[0] - kb[0] > self.min_margin:
            return True
        if self.drop_ties or kb[0] != kw[0] or self.min_margin > 0:
            return False
        return kb[1:] < kw[1:]


def check_judgeable(records: Sequence[Mapping], judge: str) -> None:
    """Free-text ground truth (events as strings, or untimed text events) is judged by the embedding
    and llm judges; the exact judge reads structured events only: ValueError naming the first
    record (file:line) that it cannot read, raised before any model is built."""
    if judge != "exact":
        return
    from vsalmonn_jax.eval.records import is_synthetic_event

    for record in records:
        for k, event in enumerate(record.get("events") or []):
            if not is_synthetic_event(event):
                where = f"{record.get('source', '?')}:{record.get('line', '?')}"
                raise ValueError(f"{where}: events[{k}] is free text ({event!r}); mrdpo.judge=exact "
                                 "reads only structured events (time, modality, subject, action): "
                                 "set --config.mrdpo.judge=embedding or llm")


def check_gt_captions(records: Sequence[Mapping], config) -> None:
    """mrDPO with GT guidance (mrdpo.gt_guidance, dpo.gt_ce_weight > 0: the paper's + 0.1 x CE on
    the ground-truth caption) needs each record's "caption": without one the term is silently 0.
    ValueError naming the first record (file:line) that lacks it, raised before any model is built."""
    if not bool(config.mrdpo.gt_guidance) or float(config.dpo.gt_ce_weight) <= 0:
        return
    missing = [r for r in records if gt_caption(r) is None]
    if missing:
        first = missing[0]
        raise ValueError(
            f"{first.get('source', '?')}:{first.get('line', '?')}: no ground-truth \"caption\" "
            f"({len(missing)} of {len(records)} records lack one): mrDPO's GT guidance "
            f"(dpo.gt_ce_weight={float(config.dpo.gt_ce_weight):g} x CE on the GT caption) would be 0 "
            "for them; add the captions, or set --config.mrdpo.gt_guidance=False (not the paper's recipe)")


def judged_text(sample: Sample) -> str:
    """What the judge reads: a caption without an end token has its runaway repeats collapsed."""
    from vsalmonn_jax.eval import collapse_repeats

    return sample.text if sample.stopped else collapse_repeats(sample.text)


def score_samples(judge, items: Sequence[Mapping], samples: Sequence[Sequence[Sample]]) -> list[list]:
    """VideoScores [video][sample] for k samples per video against each item's "events"."""
    if len(items) != len(samples):
        raise ValueError(f"score_samples: {len(items)} videos but {len(samples)} sample lists")
    pairs, ids = [], []
    for item, row in zip(items, samples, strict=True):
        if "events" not in item:
            raise ValueError(f"video {item.get('id', '?')!r} has no ground-truth 'events' to score against")
        for j, sample in enumerate(row):
            pairs.append((judged_text(sample), item["events"]))
            ids.append(f"{item.get('id', '')}#{j}")
    flat = judge.score_many(pairs, ids=ids) if pairs else []
    out, pos = [], 0
    for row in samples:
        out.append(flat[pos:pos + len(row)])
        pos += len(row)
    return out


def sentence_count(text: str) -> int:
    """Sentences of a caption (eval/text.py's splitter): the length the pair diagnostics compare."""
    from vsalmonn_jax.eval.text import split_sentences

    return len(split_sentences(text))


def _choose(rule: PairRule, scores: Sequence, lengths: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs among one video's samples (`lengths`: their sentence
    counts, needed by max_length_gap >= 0)."""
    usable = [j for j, s in enumerate(scores) if not s.failed]
    if len(usable) < 2:
        return []
    gap = rule.max_length_gap
    if rule.mode == "best_worst" and rule.rule != "dominance" and gap < 0:   # a ranking: its two ends
        order = sorted(usable, key=lambda j: (rule.key(scores[j]), j))
        best, worst = order[0], order[-1]
        return [(best, worst)] if rule.prefers(scores[best], scores[worst]) else []
    close = (lambda a, b: True) if gap < 0 else (lambda a, b: abs(lengths[a] - lengths[b]) <= gap)
    accepted = [(a, b) for a, b in itertools.permutations(usable, 2)
                if close(a, b) and rule.prefers(scores[a], scores[b])]
    if rule.mode == "all" or not accepted:
        return accepted
    margin = lambda ab: rule.error(scores[ab[1]]) - rule.error(scores[ab[0]])
    return [max(accepted, key=margin)]   # dominance is no ranking: the widest accepted pair


def gt_caption(item: Mapping) -> str | None:
    """The ground-truth caption of a video (its "caption" field, else None)."""
    text = item.get("caption")
    return text if isinstance(text, str) and text.strip() else None


UNFINISHED = ("collapsed", "as_sampled")   # how a rejected sample that never stopped is trained


def build_pairs(items: Sequence[Mapping], samples: Sequence[Sequence[Sample]],
                scores: Sequence[Sequence], rule: PairRule, *, default_prompt: str,
                gt: bool = True, ce_only_records: bool = False,
                unfinished: str = "collapsed") -> list[dict]:
    """Preference records for one round.

    Each pair record carries the video's media path(s), prompt, chosen / rejected caption texts,
    the ground-truth caption as `gt` (the CE guidance; `gt=False` leaves it out), and the scores of
    both sides for the logs. With `ce_only_records`, a video without a usable pair still gives a
    CE-only record (gt only), as some records of the official data are. A sample without an end
    token is judged with its repeats collapsed; `unfinished` "collapsed" trains it so too (with the
    closing end token), "as_sampled" trains a rejected one as the policy wrote it: its full text,
    no end token (`rejected_stopped: false`), so DPO pushes down the loop itself.
    """
    if unfinished not in UNFINISHED:
        raise ValueError(f"mrdpo.unfinished must be one of {UNFINISHED}, got {unfinished!r}")
    records = []
    for item, row, row_scores in zip(items, samples, scores, strict=True):
        base = {k: item[k] for k in MEDIA_FIELDS if item.get(k) is not None}
        base["prompt"] = item.get("prompt") or default_prompt
        truth = gt_caption(item) if gt else None
        lengths = [sentence_count(judged_text(sample)) for sample in row]
        chosen = _choose(rule, row_scores, lengths)
        for c, r in chosen:
            sampled = unfinished == "as_sampled" and not row[r].stopped
            record = dict(base, id=f"{item.get('id', '')}:{c}>{r}", video_id=str(item.get("id", "")),
                          chosen=judged_text(row[c]),
                          rejected=row[r].text if sampled else judged_text(row[r]),
                          chosen_error=rule.error(row_scores[c]),
                          rejected_error=rule.error(row_scores[r]),
                          chosen_score=score_counts(row_scores[c]), rejected_score=score_counts(row_scores[r]))
            if sampled:
                record["rejected_stopped"] = False
            if truth is not None:
                record["gt"] = truth
            records.append(record)
        if not chosen and ce_only_records and truth is not None:
            records.append(dict(base, id=f"{item.get('id', '')}:gt", video_id=str(item.get("id", "")),
                                gt=truth))
    return records


def score_counts(score) -> dict:
    """The judged counts of one VideoScore as a JSON-able dict (pair records, sample logs)."""
    return {"missed": float(score.missed), "incorrect": float(score.incorrect),
            "hallucinated": float(score.hallucinated), "events": int(score.num_events)}


def pair_stats(items: Sequence[Mapping], samples: Sequence[Sequence[Sample]],
               scores: Sequence[Sequence], records: Sequence[Mapping]) -> dict:
    """Round statistics: videos, samples, pairs (per video), ties, the samples' mean error rates."""
    from vsalmonn_jax.eval import aggregate

    flat = [s for row in scores for s in row]
    micro = aggregate(flat)["micro"] or {}
    pairs = [r for r in records if "chosen" in r]
    stopped = [s.stopped for row in samples for s in row]
    return {
        **length_stats(pairs),
        "videos": len(items),
        "samples": len(flat),
        "failed_scores": sum(1 for s in flat if s.failed),
        "pairs": len(pairs),
        "ce_only": len(records) - len(pairs),
        "pairs_per_video": len(pairs) / max(len(items), 1),
        "videos_with_pair": len({r["video_id"] for r in pairs}),
        "sample_no_end_token_rate": (sum(not s for s in stopped) / len(stopped)) if stopped else 0.0,
        "sample_miss": micro.get("miss", 0.0),
        "sample_incorrect": micro.get("incorrect", 0.0),
        "sample_hallucination": micro.get("hallucination", 0.0),
        "sample_total": micro.get("total", 0.0),
        "mean_error_margin": (sum(r["rejected_error"] - r["chosen_error"] for r in pairs)
                              / len(pairs)) if pairs else 0.0,
    }


def length_stats(pairs: Sequence[Mapping]) -> dict:
    """Length diagnostics of preference records: how many chosen captions have fewer / more / as
    many sentences as their rejected one, and the mean sentence gap (chosen - rejected)."""
    gaps = [sentence_count(r["chosen"]) - sentence_count(r["rejected"]) for r in pairs]
    return {"chosen_shorter": sum(g < 0 for g in gaps), "chosen_longer": sum(g > 0 for g in gaps),
            "chosen_same_length": sum(g == 0 for g in gaps),
            "mean_sentence_gap": sum(gaps) / len(gaps) if gaps else 0.0}
