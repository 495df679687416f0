"""The llm judge against a local scripted OpenAI-compatible server: retries, fallback, median of
passes, concurrency limit, on-disk cache, failure reporting and a key that never leaks."""

import json
import logging
import pathlib
import types

import pytest
from fake_openai import FakeOpenAI, case_of, is_count_prompt
from machine import scaled

from vsalmonn_jax.eval import llm_judge
from vsalmonn_jax.eval.judge import get_judge
from vsalmonn_jax.eval.metrics import aggregate

SECRET = "sk-test-DO-NOT-LEAK-8c1f"
EVENTS = ["A man opens a door.", "A dog barks twice.", "Rain falls on the roof.", "A bell rings."]
GOOD = json.dumps({"missed": [3], "incorrect": [2], "hallucinated": ["a cat meows"]})


def scripted(body, nth, auth):
    case = case_of(body)
    if case == "good":
        return 200, GOOD
    if case == "malformed":  # two broken replies, then a good one
        return (200, "Sure! {missed: [3]") if nth < 2 else (200, f"```json\n{GOOD}\n```")
    if case == "fallback":  # the full prompt never parses; the count-only prompt does
        if is_count_prompt(body):
            return 200, json.dumps({"missed": 1, "incorrect": 1, "hallucinated": 2})
        return 200, json.dumps({"missed": [9], "incorrect": [], "hallucinated": []})  # 9 > 4 events
    if case == "down":
        return 500, "internal error"
    if case == "flaky":  # the pass with seed 2025 always fails
        return (500, "internal error") if body["seed"] == 2025 else (200, GOOD)
    if case == "auth":  # echoes the credentials, as some proxies do: must be redacted
        return 401, f"invalid key {auth}"
    if case == "passes":  # missed grows with the seed: 2024 -> 1, 2025 -> 2, 2026 -> 3 (median 2)
        k = body["seed"] - 2023
        return 200, json.dumps({"missed": list(range(1, k + 1)), "incorrect": [],
                                "hallucinated": [f"x{j}" for j in range(3 - k)]})
    return 500, f"unscripted case {case!r}"


@pytest.fixture
def judge_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VSALMONN_JUDGE_API_KEY", SECRET)
    delays = []
    monkeypatch.setattr(llm_judge, "time", types.SimpleNamespace(sleep=delays.append))
    return tmp_path / "cache", delays


def make_judge(server, cache_dir, **overrides):
    options = dict(base_url=server.base_url, model="judge-test", passes=1, max_retries=2,
                   fallback_retries=1, backoff_s=0.5, backoff_max_s=10.0, concurrency=3,
                   cache_dir=str(cache_dir), timeout_s=10.0)
    options.update(overrides)
    return get_judge("llm", {"llm_base_url": "ignored"}, **options)


def test_retries_fallback_failures_cache_and_key(judge_env, caplog):
    cache_dir, delays = judge_env
    cases = ["good", "malformed", "fallback", "down", "auth"]
    pairs = [(f"CASE {c}. A man opens a door.", EVENTS) for c in cases]
    with caplog.at_level(logging.WARNING), FakeOpenAI(scripted) as server:
        judge = make_judge(server, cache_dir)
        scores = {s.id: s for s in judge.score_many(pairs, ids=cases)}
        first_requests = dict(server.per_case)

        good = scores["good"]
        assert (good.missed, good.incorrect, good.hallucinated) == (1, 1, 1)
        assert good.event_labels == ["correct", "incorrect", "missed", "correct"]
        assert good.missed_events == ["Rain falls on the roof."]
        assert good.hallucinated_sentences == ["a cat meows"]
        # retries: two malformed replies, then the good one (fenced JSON is accepted)
        assert first_requests["malformed"] == 3
        assert (scores["malformed"].missed, scores["malformed"].incorrect) == (1, 1)
        assert len(scores["malformed"].details["errors"]) == 2
        # fallback: 1 + 2 full attempts rejected (event 9 of 4), then the count-only prompt
        fb = scores["fallback"]
        assert first_requests["fallback"] == 4
        assert (fb.missed, fb.incorrect, fb.hallucinated, fb.failed) == (1, 1, 2, False)
        assert fb.details["fallback_passes"] == 1 and fb.event_labels is None
        # HTTP 500 everywhere: every retry of both prompts, then reported as failed
        down = scores["down"]
        assert first_requests["down"] == (1 + 2) + (1 + 1)
        assert down.failed and "InternalServerError" in down.error
        # 401 is not retried; the echoed key is redacted
        assert first_requests["auth"] == 1 and scores["auth"].failed
        assert "***" in scores["auth"].error and SECRET not in scores["auth"].error

        summary = aggregate(scores.values())
        assert summary["failed"] == 2 and summary["failed_ids"] == ["down", "auth"]
        assert summary["scored"] == 3 and summary["events"] == 12
        assert summary["counts"] == {"missed": 3.0, "incorrect": 3.0, "hallucinated": 4.0}
        # exponential backoff: retries 1, 2 of each prompt wait 0.5, 1.0 s
        assert sorted(delays) == sorted([0.5, 1.0] + [0.5, 1.0] + [0.5, 1.0, 0.5])
        assert judge.stats["fallback_passes"] == 1 and judge.stats["failed_passes"] == 2

        # the key is sent, and only in the Authorization header
        assert set(server.auth_headers) == {f"Bearer {SECRET}"}
        assert all(b["temperature"] == 0.0 and b["top_p"] == 0.1 and b["seed"] == 2024
                   and b["response_format"] == {"type": "json_object"} for b in server.requests)

        # rerun with a fresh judge: parsed replies come from the cache, only failures are re-asked
        rerun = {s.id: s for s in make_judge(server, cache_dir).score_many(pairs, ids=cases)}
        for case in ("good", "malformed", "fallback"):
            assert server.per_case[case] == first_requests[case], case
            assert rerun[case].to_dict()["missed"] == scores[case].missed
            assert rerun[case].details["cached_passes"] == 1
        assert server.per_case["down"] == 2 * first_requests["down"]
        assert rerun["down"].failed

    assert SECRET not in caplog.text and "InternalServerError" in caplog.text
    cached = list(pathlib.Path(cache_dir).rglob("*.json"))
    assert len(cached) == 3  # good, malformed (its good reply), fallback count reply
    assert not any(SECRET in p.read_text() for p in cached)
    assert not any(SECRET in json.dumps(s.to_dict()) for s in scores.values())


def test_median_of_passes_seeds_and_concurrency(judge_env):
    cache_dir, _ = judge_env
    with FakeOpenAI(scripted, delay_s=0.05) as server:
        judge = make_judge(server, cache_dir, passes=3, concurrency=2)
        pairs = [(f"CASE passes. video {i}.", EVENTS) for i in range(4)]
        scores = judge.score_many(pairs)
        assert server.max_in_flight <= 2
        assert sorted({b["seed"] for b in server.requests}) == [2024, 2025, 2026]
    for score in scores:
        # per-pass (missed, incorrect, hallucinated) = (1,0,2), (2,0,1), (3,0,0): medians 2, 0, 1
        assert score.details["pass_counts"] == [[1, 0, 2], [2, 0, 1], [3, 0, 0]]
        assert (score.missed, score.incorrect, score.hallucinated) == (2, 0, 1)
        assert score.event_labels == ["missed", "missed", "correct", "correct"]  # the median pass


def test_the_run_takes_its_median_pass_not_per_video_medians():
    """The paper reports the median of its passes. Per-video, per-category medians pushed errors a
    judge reports in one pass only to zero: videos A, B, C each missing 5 of 10 events in a
    different pass (every pass's micro Miss 5/30) gave Miss 0 %, and D's (3,0,0) / (0,3,0) /
    (0,0,3) gave Total 0. Now one pass (the median by run-level errors) scores every video."""
    P = llm_judge.PassResult

    def ok(counts, missed=()):
        return P(ok=True, kind="full", counts=counts,
                 lists={"missed": list(missed), "incorrect": [], "hallucinated": []})

    events = [f"event {k}" for k in range(10)]
    spread = [[ok((5, 0, 0), range(5)) if p == v else ok((0, 0, 0)) for p in range(3)] for v in range(3)]
    rotated = [ok((3, 0, 0), range(3)), ok((0, 3, 0)), ok((0, 0, 3))]
    judge = llm_judge.LlmJudge.__new__(llm_judge.LlmJudge)
    for videos, want_miss, want_total in ((spread, 5 / 30, 5 / 30), (spread + [rotated], 5 / 40, 8 / 40)):
        chosen = llm_judge.median_pass(videos)
        scores = [judge.combine(str(v), events, passes, chosen) for v, passes in enumerate(videos)]
        micro = aggregate(scores)["micro"]
        assert micro["miss"] == pytest.approx(want_miss) and micro["total"] == pytest.approx(want_total)
        for score in scores:   # labels and counts come from the same pass
            assert score.event_labels.count("missed") == score.missed


def test_the_cache_key_holds_the_endpoint_the_client_uses(judge_env, monkeypatch):
    """With eval.llm_base_url unset the client reads OPENAI_BASE_URL: two servers of the same model
    name shared cache keys (keyed on the empty setting), so one's answers were reused for the other."""
    cache_dir, _ = judge_env
    keys, described = [], []
    for url in ("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"):
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        judge = get_judge("llm", {}, model="judge-test", cache_dir=str(cache_dir))
        keys.append(judge._cache_key([{"role": "user", "content": "x"}], 2024))
        described.append(judge.describe()["base_url"])
    assert keys[0] != keys[1] and described[0].startswith("http://127.0.0.1:9/v1")


def test_a_failed_pass_is_reported_not_hidden(judge_env):
    cache_dir, _ = judge_env
    with FakeOpenAI(scripted) as server:
        judge = make_judge(server, cache_dir, passes=3, max_retries=1, fallback_retries=0)
        (score,) = judge.score_many([("CASE flaky. A door opens.", EVENTS)], ids=["flaky"])
        assert server.per_case["flaky"] == 2 + (1 + 1 + 1)  # two good passes, 3 failed requests
    assert not score.failed and (score.missed, score.incorrect, score.hallucinated) == (1, 1, 1)
    assert score.details["passes_ok"] == 2 and score.details["pass_counts"][1] is None
    assert len(score.details["errors"]) == 3
    assert aggregate([score])["partial_ids"] == ["flaky"]


def test_parsers_reject_bad_replies():
    with pytest.raises(ValueError, match="both missed and incorrect"):
        llm_judge.parse_full('{"missed": [1], "incorrect": [1], "hallucinated": []}', 3)
    with pytest.raises(ValueError, match="outside 1..3"):
        llm_judge.parse_full('{"missed": [0], "incorrect": [], "hallucinated": []}', 3)
    with pytest.raises(ValueError, match="no JSON object"):
        llm_judge.parse_full("I think two events are missed.", 3)
    with pytest.raises(ValueError, match="> 3 events"):
        llm_judge.parse_counts('{"missed": 3, "incorrect": 1, "hallucinated": 0}', 3)
    assert llm_judge.parse_counts('{"missed": 2, "incorrect": 0, "hallucinated": [1, 2]}', 3) == {
        "missed": 2, "incorrect": 0, "hallucinated": 2}
    messages = llm_judge.build_messages("A dog barks.", EVENTS)
    assert "2. A dog barks twice." in messages[1]["content"] and "JSON" in messages[0]["content"]


def test_cli_with_llm_judge_reports_failures_and_reuses_its_cache(judge_env, tmp_path, capsys):
    from vsalmonn_jax import cli
    from vsalmonn_jax.atomic_file import write_jsonl

    write_jsonl(tmp_path / "gt.jsonl", [{"id": c, "events": EVENTS} for c in ("good", "down")])
    write_jsonl(tmp_path / "cap.jsonl", [{"id": c, "caption": f"CASE {c}. A door opens."}
                                         for c in ("good", "down")])
    with FakeOpenAI(scripted) as server:
        argv = ["eval", "--captions", str(tmp_path / "cap.jsonl"), "--gt", str(tmp_path / "gt.jsonl"),
                "--judge", "llm", "--out", str(tmp_path / "out"),
                f"--config.eval.llm_base_url={server.base_url}", "--config.eval.passes=1",
                "--config.eval.llm_max_retries=1", "--config.eval.llm_fallback_retries=0",
                "--config.eval.llm_backoff_s=0"]
        assert cli.main(argv) == 0
        assert server.per_case == {"good": 1, "down": 3}
        assert "1 FAILED (listed in the report)" in capsys.readouterr().out
        assert cli.main(argv) == 0
        assert server.per_case == {"good": 1, "down": 6}  # the good reply came from the cache
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    agg = report["groups"][0]["aggregate"]
    assert agg["failed_ids"] == ["down"] and agg["micro"]["miss"] == 0.25
    assert report["judge"]["stats"]["cache_hits"] == 1 and report["judge"]["passes"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "could not score" in md and "`down`" in md
    assert not any(SECRET in p.read_text(errors="ignore")
                   for p in (tmp_path / "out").rglob("*") if p.is_file())


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_naming_the_url(judge_env):
    """No network used to mean 12.5 min of retries: refused connections stop after a short probe."""
    from vsalmonn_jax.eval.judge import JudgeUnavailable

    cache_dir, delays = judge_env
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    server = types.SimpleNamespace(base_url=url)
    judge = make_judge(server, cache_dir, passes=7, max_retries=8, concurrency=3, backoff_s=1.0)
    pairs = [(f"CASE good. video {i}.", EVENTS) for i in range(5)]
    with pytest.raises(JudgeUnavailable, match=f"cannot connect to {url}/? \\(ConnectError: .*; 3 "
                       "attempts\\): check eval.llm_base_url and the network"):
        judge.score_many(pairs)
    # at most one probe series per worker thread (1 + connect_retries requests), 1 + 2 s of sleep each
    assert judge.stats["requests"] <= 3 * 3 and sum(delays) <= 3 * 3.0


def test_eval_cli_stops_at_once_on_a_closed_port(tmp_path):
    import os
    import subprocess
    import sys

    gt, captions = tmp_path / "gt.jsonl", tmp_path / "cap.jsonl"
    gt.write_text(json.dumps({"id": "a", "events": EVENTS}) + "\n")
    captions.write_text(json.dumps({"id": "a", "caption": "A man opens a door."}) + "\n")
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "eval", "--captions", str(captions),
                           "--gt", str(gt), "--judge", "llm", "--out", str(tmp_path / "r"),
                           f"--config.eval.llm_base_url={url}"],
                          capture_output=True, text=True, timeout=scaled(240), env=env)   # was 12.5 min
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"vsalmonn-jax eval: error: llm judge: cannot connect to {url}" in done.stderr
