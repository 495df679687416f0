"""Caption text helpers shared by the metrics and the judges: sentence / clause splitting, numbers.

Sentences end at . ! ? or a line break (not after common abbreviations or inside decimals);
clauses split a sentence further at ';', at ', and' / ', then' / ', while' joins, before a
participle after a comma (", taking ...") and at "and then" (a bare "and" is kept: events are often
compound too, "sits down and reads"); pieces under `min_words` words stay joined to the piece before.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = ("mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "approx.", "no.")
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+|\n+")
_DETERMINERS = ("a|an|the|his|her|their|its|my|our|your|this|that|these|those|some|two|three|four|"
                "several|many|other|another")
_CLAUSE_JOIN = re.compile(
    r"(\s*;\s*|,\s+(?:and then|then|while|and|but|whereas)\s+|,\s+(?=[a-z]+ing\b)"
    rf"|\s+and\s+then\s+(?!(?:{_DETERMINERS})\b))", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"\w+", re.UNICODE)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences; abbreviations like "Mr." and decimals like "2.5" do not end one."""
    pieces, current = [], ""
    last = 0
    for match in _SENTENCE_END.finditer(text):
        chunk = text[last:match.start()] + (match.group(1) or "")  # keep closing quotes
        last = match.end()
        current = f"{current} {chunk}".strip() if current else chunk.strip()
        tail = current.lower().rsplit(" ", 1)[-1]
        if "\n" not in match.group(0) and tail in _ABBREVIATIONS:
            continue
        if current:
            pieces.append(current)
        current = ""
    rest = text[last:].strip()
    current = f"{current} {rest}".strip() if current else rest
    if current:
        pieces.append(current)
    return pieces


def split_clauses(sentence: str, min_words: int = 2) -> list[str]:
    """Split a sentence at clause joins; a piece shorter than `min_words` words is put back."""
    pieces = _CLAUSE_JOIN.split(sentence.strip())  # [text, join, text, join, ...]
    clauses: list[str] = []
    for k in range(0, len(pieces), 2):
        text = pieces[k]
        if clauses and (len(words(text)) < min_words or len(words(clauses[-1])) < min_words):
            clauses[-1] += pieces[k - 1] + text
        else:
            clauses.append(text)
    out = [c.strip(" ,") for c in clauses]
    return [c for c in out if c] or [sentence.strip()]


def split_units(text: str, clauses: bool = True, min_clause_words: int = 2) -> list[str]:
    """The caption's statements the embedding judge matches against events."""
    units = []
    for sentence in split_sentences(text):
        units += split_clauses(sentence, min_clause_words) if clauses else [sentence]
    return [u for u in units if words(u)]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the identity used for duplicates."""
    return " ".join(words(text))


def numbers(text: str) -> frozenset[float]:
    return frozenset(float(n) for n in _NUMBER.findall(text))
