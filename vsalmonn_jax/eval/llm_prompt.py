"""The llm judge's prompts (full grading, count-only fallback) and the parsing of its JSON replies.

A reply that does not parse raises ValueError naming what is wrong; eval/llm_judge.py retries it
with that error as a follow-up message (`retry_messages`). Parsing is strict where leniency would
inflate counts: keys are read case-insensitively; an event number must be an integer (a bool, a
fraction or "event 2" is a parse failure, never silently event 1 or 2); hallucinated entries that are
empty or placeholders ("None", "n/a", "-", "null") are dropped and repeats (same text up to case and
whitespace) count once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from vsalmonn_jax.eval.records import event_text

SYSTEM_FULL = (
    "You grade a video caption against the complete list of atomic events that happen in the video. "
    "The list is the ground truth: nothing else happens in the video.\n"
    "For every numbered event decide one of:\n"
    "- correct: the caption states it and gets its details right;\n"
    "- incorrect: the caption refers to it but gets a detail wrong (who or what, colour, number, "
    "action, sound, words spoken, time or order);\n"
    "- missed: the caption does not mention it.\n"
    "Then list every statement of the caption that describes something which is not among the events "
    "(hallucinated); a wrong detail of a listed event counts as incorrect, not hallucinated.\n"
    "Reply with one JSON object and nothing else:\n"
    '{"missed": [event numbers], "incorrect": [event numbers], '
    '"hallucinated": ["short quote from the caption", ...]}')
SYSTEM_COUNT = (
    "You grade a video caption against the complete list of atomic events that happen in the video. "
    "Count the events the caption does not mention (missed), the events it mentions with a wrong "
    "detail (incorrect), and the statements of the caption that describe things not among the events "
    "(hallucinated). Reply with one JSON object and nothing else: "
    '{"missed": <int>, "incorrect": <int>, "hallucinated": <int>}')


def format_events(events: Sequence) -> str:
    return "\n".join(f"{i}. {event_text(e)}" for i, e in enumerate(events, start=1))


def build_messages(caption: str, events: Sequence, count_only: bool = False) -> list[dict]:
    user = (f"Events ({len(events)}):\n{format_events(events) or '(none)'}\n\n"
            f"Caption:\n\"\"\"\n{caption.strip()}\n\"\"\"")
    return [{"role": "system", "content": SYSTEM_COUNT if count_only else SYSTEM_FULL},
            {"role": "user", "content": user}]


def extract_json(content: str) -> dict:
    """The JSON object in a reply (code fences and text around it tolerated)."""
    if content is None:
        raise ValueError("empty reply")
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", content.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError(f"no JSON object in reply {content[:80]!r}")
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON in reply ({err.msg}): {content[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"reply is not a JSON object: {content[:80]!r}")
    return obj


PLACEHOLDERS = frozenset({"", "none", "n/a", "na", "null", "nil", "nothing", "-", "--"})


def _lower_keys(obj: dict) -> dict:
    """Keys lower-cased and stripped ("Missed" is "missed"); two spellings of one key must agree."""
    out = {}
    for key, value in obj.items():
        name = str(key).strip().lower()
        if name in out and out[name] != value:
            raise ValueError(f"reply field {name!r} given twice with different values")
        out[name] = value
    return out


def _event_number(item, key: str) -> int:
    """1-based event number: an int, an integral float (2.0) or a digit string ("2")."""
    if isinstance(item, bool):
        number = None
    elif isinstance(item, int):
        number = item
    elif isinstance(item, float) and item.is_integer():
        number = int(item)
    elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*", item):
        number = int(item)
    else:
        number = None
    if number is None:
        raise ValueError(f"reply field {key!r} holds {item!r}, not an event number")
    return number


def _index_list(obj: dict, key: str, num_events: int) -> list[int]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ValueError(f"reply field {key!r} must be a list of event numbers, got {value!r}")
    out = []
    for item in value:
        number = _event_number(item, key)
        if not 1 <= number <= num_events:
            raise ValueError(f"reply field {key!r} holds event {number}, outside 1..{num_events}")
        out.append(number - 1)
    return sorted(set(out))


def statements(items: list) -> list[str]:
    """Hallucinated entries as strings: placeholders and empty entries dropped, each text once
    (compared after collapsing whitespace and case), in the reply's order."""
    out, seen = [], set()
    for item in items:
        if item is None:
            continue
        text = " ".join(str(item).split())
        key = text.lower()
        if key.strip(".!\"'`()[] ") in PLACEHOLDERS or key in seen:
            continue
        seen.add(key)
        out.append(text)
    return out


def parse_full(content: str, num_events: int) -> dict:
    obj = _lower_keys(extract_json(content))
    missed, incorrect = _index_list(obj, "missed", num_events), _index_list(obj, "incorrect", num_events)
    both = set(missed) & set(incorrect)
    if both:
        raise ValueError(f"events {sorted(i + 1 for i in both)} are both missed and incorrect")
    hallucinated = obj.get("hallucinated")
    if not isinstance(hallucinated, list):
        raise ValueError(f"reply field 'hallucinated' must be a list, got {hallucinated!r}")
    return {"missed": missed, "incorrect": incorrect, "hallucinated": statements(hallucinated)}


def parse_counts(content: str, num_events: int) -> dict:
    obj = _lower_keys(extract_json(content))
    counts = {}
    for key in ("missed", "incorrect", "hallucinated"):
        value = obj.get(key)
        if isinstance(value, list):
            value = len(statements(value))
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != int(value):
            raise ValueError(f"count reply field {key!r} must be a non-negative integer, got {value!r}")
        counts[key] = int(value)
    if counts["missed"] + counts["incorrect"] > num_events:
        raise ValueError(f"count reply has missed + incorrect = {counts['missed'] + counts['incorrect']} "
                         f"> {num_events} events")
    return counts


def retry_messages(messages: list[dict], reply: str, error: Exception | str) -> list[dict]:
    """The request again, followed by the reply that did not parse and why, so a retry at the same
    seed and temperature 0 is not the same request (which would fail the same way)."""
    return [*messages, {"role": "assistant", "content": (reply or "")[:4000]},
            {"role": "user", "content": f"That reply could not be used: {error}. Reply again with "
                                        "only the JSON object in the format asked for, nothing else."}]
