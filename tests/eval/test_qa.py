"""Multiple-choice QA: prompt building, answer-letter extraction, accuracy overall and per category."""

import json

import pytest

from vsalmonn_jax.data import synthetic_scene
from vsalmonn_jax.data.text import mcq_answer
from vsalmonn_jax.eval.qa import (
    answer_letter,
    build_mcq_prompt,
    extract_answer,
    load_questions,
    qa_accuracy,
)
from vsalmonn_jax.eval.records import RecordError

OPTIONS = ["a high beep", "a low beep", "a dog is barking", "a falling chirp"]


def test_prompt_lists_letters_and_strips_given_prefixes():
    prompt = build_mcq_prompt("What sound is heard at 3 s?", ["A. a high beep", "B. a low beep"])
    assert prompt.splitlines()[-3:] == ["A. a high beep", "B. a low beep", "The best answer is:"]
    assert "What sound is heard at 3 s?" in prompt
    with pytest.raises(ValueError, match="2..10 options"):
        build_mcq_prompt("q", ["only one"])


@pytest.mark.parametrize("response, expected", [
    ("B", "B"), ("(C)", "C"), ("D. a falling chirp", "D"), ("The answer is B.", "B"),
    ("Answer: (D)", "D"), ("The best answer is: C", "C"), ("I pick option A here", "A"),
    ("C\n", "C"), ("I think it is C, because the sound falls.", "C"),
    ("A dog is barking in the clip.", "C"),      # article "A", then the option text
    ("a low beep", "B"), ("A or B", None), ("", None), ("No idea.", None),
    ("E", None),                                  # not an option of a 4-way question
    ("Option A is incorrect; the answer is C.", "C"),   # an option named to reject it (was A)
    ("Choice B would be wrong, so the answer is D", "D"), ("Option A or option C", None),
    ("The correct answer is B. Answer A is wrong because the tone rises.", "B"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response, OPTIONS) == expected


def test_synthetic_generator_answers_are_extracted():
    scene = synthetic_scene.make_scene(3, 11)
    for item in synthetic_scene.qa_items(scene, 3):
        reply = mcq_answer(item["options"], item["answer"])
        assert extract_answer(reply, item["options"]) == "ABCD"[item["answer"]]


def test_accuracy_overall_per_category_and_missing(tmp_path):
    questions = [
        {"id": "q1", "question": "?", "options": OPTIONS, "answer": "B", "duration": "short"},
        {"id": "q2", "question": "?", "options": OPTIONS, "answer": 2, "duration": "short"},
        {"id": "q3", "question": "?", "options": OPTIONS, "answer": "A. a high beep", "duration": "long"},
        {"id": "q4", "question": "?", "options": OPTIONS, "answer": "D", "duration": "long"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    loaded = load_questions(path)
    assert [q["answer"] for q in loaded] == ["B", "C", "A", "D"]
    predictions = {"q1": "B", "q2": "The answer is A", "q3": "hmm", "extra": "A"}
    result = qa_accuracy(loaded, predictions)
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 1, 0.25)
    assert result["unanswered_ids"] == ["q3"] and result["missing_prediction_ids"] == ["q4"]
    assert result["predictions_without_question"] == ["extra"]
    assert result["per_category"]["duration"] == {
        "long": {"n": 2, "correct": 0, "accuracy": 0.0},
        "short": {"n": 2, "correct": 1, "accuracy": 0.5}}


def test_bad_question_records_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "?", "options": OPTIONS, "answer": "B"}) + "\n"
                    + json.dumps({"id": "y", "question": "?", "options": OPTIONS, "answer": 7}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: answer index 7 outside 0..3"):
        load_questions(path)
    with pytest.raises(RecordError, match="neither a letter"):
        answer_letter("F", 4)
