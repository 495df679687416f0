"""The llm judge's reply handling: strict parsing (placeholders, repeats, bools, fractions, key case),
retries of an unparsable reply that tell the judge why, and refused connections that stop the run
only when they are consecutive."""

import json
import types

import openai
import pytest
from fake_openai import FakeOpenAI, case_of, is_count_prompt

from vsalmonn_jax.eval import llm_judge
from vsalmonn_jax.eval.judge import JudgeUnavailable
from vsalmonn_jax.eval.llm_prompt import parse_counts, parse_full

EVENTS = ["A man opens a door.", "A dog barks twice.", "Rain falls on the roof.", "A bell rings."]
GOOD = json.dumps({"missed": [3], "incorrect": [2], "hallucinated": ["a cat meows"]})
COUNTS = json.dumps({"missed": 1, "incorrect": 1, "hallucinated": 1})


def reply(missed=(), incorrect=(), hallucinated=(), **keys) -> str:
    return json.dumps(keys or {"missed": list(missed), "incorrect": list(incorrect),
                               "hallucinated": list(hallucinated)})


# ---- finding 1: parsing ----

@pytest.mark.parametrize("entries, kept", [
    (["None"], []), ([""], []), (["n/a", "-", "null", None, "  ", "NONE."], []),
    (["a cat meows", "A cat  meows", " a CAT meows "], ["a cat meows"]),
    (["a cat meows", "none", "a car honks"], ["a cat meows", "a car honks"]),
])
def test_placeholder_and_repeated_hallucinations_count_once_or_not_at_all(entries, kept):
    assert parse_full(reply(hallucinated=entries), 4)["hallucinated"] == kept
    counts = parse_counts(json.dumps({"missed": 0, "incorrect": 0, "hallucinated": entries}), 4)
    assert counts["hallucinated"] == len(kept)


@pytest.mark.parametrize("item", [True, False, 2.7, "2.7", "event 2", None, [2]])
def test_bools_and_fractions_are_not_event_numbers(item):
    with pytest.raises(ValueError, match="not an event number"):
        parse_full(reply(missed=[item]), 4)


def test_integral_numbers_in_any_form_are_event_numbers():
    assert parse_full(reply(missed=[2.0, "3", 1], incorrect=[" 4 "]), 4)["missed"] == [0, 1, 2]


def test_reply_keys_are_case_insensitive():
    parsed = parse_full(json.dumps({"Missed": [1], "INCORRECT": [2], " Hallucinated ": ["x"]}), 4)
    assert parsed == {"missed": [0], "incorrect": [1], "hallucinated": ["x"]}
    assert parse_counts(json.dumps({"Missed": 1, "Incorrect": 0, "Hallucinated": 2}), 4) == {
        "missed": 1, "incorrect": 0, "hallucinated": 2}
    with pytest.raises(ValueError, match="given twice"):
        parse_full(json.dumps({"missed": [1], "Missed": [2], "incorrect": [], "hallucinated": []}), 4)


# ---- finding 2: a retry after an unparsable reply says what was wrong ----

@pytest.fixture
def no_sleep(monkeypatch):
    delays = []
    monkeypatch.setattr(llm_judge, "time", types.SimpleNamespace(sleep=delays.append))
    return delays


def _judge(client=None, **options):
    base = dict(model="judge-test", passes=1, max_retries=2, fallback_retries=1, connect_retries=2,
                backoff_s=0.0, concurrency=1, timeout_s=10.0)
    return llm_judge.LlmJudge(llm_judge.LlmOptions(**{**base, **options}), client=client)


def follow_up_only(body, nth, auth):
    """A judge that only gets the format right once told what was wrong (a plain resend of the
    same request, same seed, temperature 0, would get the same bad reply)."""
    messages = body["messages"]
    if is_count_prompt(body):
        return 500, "count-only prompt: not expected"
    if case_of(body) == "busy" and nth == 0:
        return 500, "overloaded"
    if len(messages) == 2:
        return 200, reply(missed=[True], hallucinated=["a cat meows"]) if case_of(body) != "busy" else GOOD
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == reply(missed=[True], hallucinated=["a cat meows"])
    assert "not an event number" in messages[3]["content"]
    return 200, GOOD


def test_an_unparsable_reply_is_retried_with_its_parse_error(no_sleep, tmp_path):
    with FakeOpenAI(follow_up_only) as server:
        judge = _judge(base_url=server.base_url, cache_dir=str(tmp_path))
        (score,) = judge.score_many([("CASE fix. A man opens a door.", EVENTS)], ids=["fix"])
        assert server.per_case == {"fix": 2}
        assert not score.failed and score.details["fallback_passes"] == 0
        assert (score.missed, score.incorrect, score.hallucinated) == (1, 1, 1)
        assert "not an event number" in score.details["errors"][0]
        # the request is otherwise the same: seed, sampling, the original prompt
        first, second = server.requests
        assert {k: v for k, v in first.items() if k != "messages"} == {
            k: v for k, v in second.items() if k != "messages"}
        assert second["messages"][:2] == first["messages"]
        # the good reply is cached under the original request: a rerun asks nothing
        rerun = _judge(base_url=server.base_url, cache_dir=str(tmp_path))
        (again,) = rerun.score_many([("CASE fix. A man opens a door.", EVENTS)], ids=["fix"])
        assert server.per_case == {"fix": 2} and again.details["cached_passes"] == 1


def test_an_api_error_is_retried_as_the_same_request(no_sleep):
    with FakeOpenAI(follow_up_only) as server:
        (score,) = _judge(base_url=server.base_url).score_many(
            [("CASE busy. A man opens a door.", EVENTS)], ids=["busy"])
        assert server.per_case == {"busy": 2} and not score.failed
        assert server.requests[0]["messages"] == server.requests[1]["messages"]


# ---- finding 3: a refused connection stops the run only when consecutive ----

def _refused() -> openai.APIConnectionError:
    err = openai.APIConnectionError(request=None)
    err.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return err


class StubClient:
    """`client.chat.completions.create(**kwargs)` answering `script(kwargs, nth)`; nth counts the
    requests of the same (seed, prompt kind). An exception is raised, a string is the reply."""

    def __init__(self, script):
        self.script, self.seen = script, {}
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self.create))

    def create(self, **kwargs):
        key = (kwargs["seed"], is_count_prompt(kwargs))
        nth = self.seen.get(key, 0)
        self.seen[key] = nth + 1
        answer = self.script(kwargs, nth)
        if isinstance(answer, Exception):
            raise answer
        message = types.SimpleNamespace(content=answer)
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])


def test_a_refusal_after_the_server_answered_fails_that_prompt_not_the_run(no_sleep):
    """Pass 0's full prompt: two unparsable replies, then one refused connection on its last retry.
    That used to raise JudgeUnavailable and stop every pass and video."""
    def script(kwargs, nth):
        if kwargs["seed"] == 2024 and not is_count_prompt(kwargs):
            return _refused() if nth == 2 else "Sure! {missed: [3]"
        return COUNTS if is_count_prompt(kwargs) else GOOD

    client = StubClient(script)
    judge = _judge(client=client, passes=2)
    (score,) = judge.score_many([("A man opens a door.", EVENTS)], ids=["v"])
    assert client.seen == {(2024, False): 3, (2024, True): 1, (2025, False): 1}
    assert not score.failed and score.details["passes_ok"] == 2
    assert score.details["fallback_passes"] == 1
    assert "APIConnectionError" in score.details["errors"][-1]


def test_consecutive_refusals_stop_the_run_even_with_no_retries_left(no_sleep):
    client = StubClient(lambda kwargs, nth: _refused())
    judge = _judge(client=client, max_retries=0, connect_retries=2)
    with pytest.raises(JudgeUnavailable, match="3 attempts"):
        judge.score_many([("A man opens a door.", EVENTS)], ids=["v"])
    assert client.seen == {(2024, False): 3}
