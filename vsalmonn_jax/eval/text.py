"""Caption text helpers shared by the metrics and the judges: sentence / clause splitting, numbers.

Sentences end at . ! ? or a line break (not after common abbreviations or inside decimals);
clauses split a sentence further at ';' and at ', and' / ', then' / ', while' joins.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = ("mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "approx.", "no.")
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+|\n+")
_CLAUSE_JOIN = re.compile(r"\s*;\s*|,\s+(?:and then|then|while|and|but|whereas)\s+", re.IGNORECASE)
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


def split_clauses(sentence: str, min_words: int = 3) -> list[str]:
    """Split a sentence at clause joins when every resulting piece has at least `min_words` words."""
    parts = [p.strip(" ,") for p in _CLAUSE_JOIN.split(sentence)]
    parts = [p for p in parts if p]
    if len(parts) <= 1 or any(len(words(p)) < min_words for p in parts):
        return [sentence.strip()]
    return parts


def split_units(text: str, clauses: bool = True, min_clause_words: int = 3) -> list[str]:
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
