"""QA answer extraction: an explicit answer statement ("the answer is / must be / would be X",
"answer: X", "the correct option is X") wins over a bare "Answer X" and over rejected options."""

import pytest

from vsalmonn_jax.eval.qa import extract_answer

OPTIONS = ["a high beep", "a low beep", "a dog is barking", "a falling chirp"]


@pytest.mark.parametrize("response, expected", [
    ("Answer A is wrong; the answer is B.", "B"),                                  # was A
    ("Option A and option B are wrong, so the answer must be C.", "C"),            # was None
    ("Answer B is unlikely, so the answer would be (D).", "D"),
    ("Answer A is out. The correct answer: C", "C"),
    ("The answer should be option B; option A is wrong.", "B"),
    ("Option A is wrong; the correct option is D.", "D"),
    ("Answer (D)", "D"), ("Answer: (D)", "D"), ("The best answer is: C", "C"),
    ("The answer must be either A or B.", None),
])
def test_explicit_answer_statements_win(response, expected):
    assert extract_answer(response, OPTIONS) == expected
