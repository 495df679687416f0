"""Multiple-choice QA accuracy (Video-MME style): prompts, answer-letter extraction, accuracy by category.

Questions: {"id", "question", "options": [...], "answer": "B" | 1, optional "category" / "task_type" /
"duration"}; predictions: {"id", "response"}. A question without a prediction, or whose response
holds no recognisable letter, counts as wrong and is listed; nothing is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from vsalmonn_jax.eval.records import RecordError, iter_jsonl
from vsalmonn_jax.eval.text import normalize

LETTERS = "ABCDEFGHIJ"
CATEGORY_FIELDS = ("category", "task_type", "duration")
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter of the correct option.")
_PREFIX = re.compile(r"^\s*\(?([A-J])[.):]\s+")
_LETTER = r"\s*\(?([{letters}])\)?(?![\w'])"
_STATED = (r"(?i:answer|option|choice)\s*(?:(?i:is|must\s+be|would\s+be|should\s+be|will\s+be)\s*:?"
           r"|[:\-])\s*(?:(?i:option|choice)\s+)?" + _LETTER)
_BARE_ANSWER = r"(?i:answer)\s*" + _LETTER


def strip_option_prefix(option: str) -> str:
    """ "B. a dog" -> "a dog" (Video-MME options carry their letter)."""
    return _PREFIX.sub("", option, count=1).strip()


def build_mcq_prompt(question: str, options: Sequence[str], instruction: str = INSTRUCTION) -> str:
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a question needs 2..{len(LETTERS)} options, got {len(options)}")
    lines = [instruction, question.strip()]
    lines += [f"{LETTERS[i]}. {strip_option_prefix(o)}" for i, o in enumerate(options)]
    return "\n".join(lines + ["The best answer is:"])


def extract_answer(response: str, options: Sequence[str] | None = None,
                   num_options: int = 4) -> str | None:
    """The chosen letter, or None when the response names none (or several) unambiguously."""
    n = len(options) if options else num_options
    letters = LETTERS[:n]
    text = (response or "").strip()
    if not text:
        return None
    # an answer statement ("the answer is / must be / would be C", "answer: C", "the correct option
    # is C") wins over options the response names to reject ("Option A is incorrect"), and over a
    # bare "Answer A" ("Answer A is wrong; the answer is B."); the first statement is the answer;
    # several options named without one: ambiguous
    for pattern in (_STATED, _BARE_ANSWER):
        answers = re.findall(pattern.format(letters=letters), text)
        if answers:
            return answers[0]
    named = set(re.findall(rf"(?i:option|choice)(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])\)?(?![\w'])", text))
    if len(named) == 1:
        return named.pop()
    if named:
        return None
    leading = re.match(rf"^\(?([{letters}])(?:[.):]|\s*$)", text)
    if leading:
        return leading.group(1)
    # standalone capitals, ignoring the article "A" before a lower-case word
    found = {m.group(1) for m in re.finditer(rf"(?<![\w'])\(?([{letters}])\)?(?![\w'])", text)
             if not (m.group(1) == "A" and re.match(r"\s+(?!or\b|and\b)[a-z]", text[m.end():]))}
    if len(found) == 1:
        return found.pop()
    if options and not found:
        said = f" {normalize(text)} "
        hits = [LETTERS[i] for i, o in enumerate(options)
                if normalize(strip_option_prefix(o)) and f" {normalize(strip_option_prefix(o))} " in said]
        if len(hits) == 1:
            return hits[0]
    return None


def answer_letter(answer, num_options: int, where: str = "") -> str:
    """A record's answer as a letter: "B", "B. text" or a 0-based index."""
    if isinstance(answer, bool):
        raise RecordError(f"{where}: answer {answer!r} is neither a letter nor an option index")
    if isinstance(answer, int):
        if not 0 <= answer < num_options:
            raise RecordError(f"{where}: answer index {answer} outside 0..{num_options - 1}")
        return LETTERS[answer]
    if isinstance(answer, str):
        match = re.match(r"^\s*\(?([A-J])(?:[.):\s]|$)", answer.strip() + " ")
        if match and LETTERS.index(match.group(1)) < num_options:
            return match.group(1)
    raise RecordError(f"{where}: answer {answer!r} is neither a letter nor an option index "
                      f"for {num_options} options")


def load_questions(path) -> list[dict]:
    questions, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("id", "question", "options", "answer"):
            if key not in obj:
                raise RecordError(f"{where}: missing field {key!r}")
        options = obj["options"]
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise RecordError(f"{where}: 'options' must be a list of 2..{len(LETTERS)} strings")
        qid = str(obj["id"])
        if qid in seen:
            raise RecordError(f"{where}: duplicate question id {qid!r}")
        seen.add(qid)
        questions.append({**obj, "id": qid, "answer": answer_letter(obj["answer"], len(options), where)})
    return questions


def load_predictions(path) -> dict[str, str]:
    predictions = {}
    for lineno, obj in iter_jsonl(path):
        if "id" not in obj or not isinstance(obj.get("response"), str):
            raise RecordError(f"{path}:{lineno}: a prediction needs 'id' and a string 'response'")
        if str(obj["id"]) in predictions:
            raise RecordError(f"{path}:{lineno}: duplicate prediction for id {obj['id']!r}")
        predictions[str(obj["id"])] = obj["response"]
    return predictions


def _bucket(rows: list[tuple[dict, bool]]) -> dict:
    correct = sum(ok for _, ok in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0}


def qa_accuracy(questions: Sequence[Mapping], predictions: Mapping[str, str],
                category_fields: Sequence[str] = CATEGORY_FIELDS) -> dict:
    """Accuracy overall and per value of each category field present in the questions."""
    rows, unanswered, missing, extracted = [], [], [], {}
    for q in questions:
        letter = answer_letter(q["answer"], len(q["options"]), f"question {q['id']!r}")
        if q["id"] not in predictions:
            missing.append(q["id"])
            choice = None
        else:
            choice = extract_answer(predictions[q["id"]], q["options"])
            if choice is None:
                unanswered.append(q["id"])
        extracted[q["id"]] = choice
        rows.append((q, choice == letter))
    per_category = {}
    for field in category_fields:
        values = sorted({str(q[field]) for q, _ in rows if field in q})
        if values:
            per_category[field] = {v: _bucket([(q, ok) for q, ok in rows if str(q.get(field)) == v])
                                   for v in values}
    extra = sorted(set(predictions) - {q["id"] for q in questions})
    return {**_bucket(rows), "unanswered_ids": unanswered, "missing_prediction_ids": missing,
            "predictions_without_question": extra, "per_category": per_category,
            "choices": extracted}
