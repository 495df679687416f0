"""The `llm` judge: any OpenAI-compatible chat endpoint grades a caption against its event list.

Per video and pass p: a JSON-output prompt (temperature 0, top_p 0.1, seed = seed + p) asks for the
missed / incorrect event numbers and the hallucinated statements; an unparsable reply or an API error
is retried with exponential backoff (max_retries; an unparsable reply's retry carries the parse
error as a follow-up message), then a count-only fallback prompt is tried. An endpoint that cannot be
connected to at all (refused, unknown host) is probed `connect_retries` more times (a few seconds)
and then stops the whole run with JudgeUnavailable naming the URL; a refusal after the server
answered only fails that pass. The paper reports the median of its passes: the pass whose run-level
error count (every video's missed + incorrect + hallucinated) is the median of the passes' gives
every video its counts and labels, so the micro rates are that pass's and Total = M + I + H; a video
whose median pass failed takes the per-category median of its passes that succeeded; a video whose
passes all failed is returned with failed=True and its errors (reported, never dropped). Parsed
replies are cached on disk (keyed by the endpoint the client resolved, model, the first request's
messages, sampling settings and seed) so a rerun costs nothing. The API key is read from the
environment (api_key_env, first set variable wins) and is never logged, cached or written into a
report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Sequence

import numpy as np

from vsalmonn_jax.atomic_file import write_json
from vsalmonn_jax.eval.judge import Judge, JudgeUnavailable, check_pairs, options_from_config
from vsalmonn_jax.eval.llm_prompt import build_messages, parse_counts, parse_full, retry_messages
from vsalmonn_jax.eval.metrics import VideoScore
from vsalmonn_jax.eval.records import event_text

log = logging.getLogger(__name__)
PROMPT_VERSION = "vsalmonn-llm-judge-v1"

@dataclasses.dataclass(frozen=True)
class LlmOptions:
    base_url: str = ""                 # "" = the client's default (OPENAI_BASE_URL or api.openai.com)
    model: str = "gpt-3.5-turbo-0125"
    api_key_env: str = "VSALMONN_JUDGE_API_KEY,OPENAI_API_KEY"  # environment variables, in order
    passes: int = 7
    seed: int = 2024
    temperature: float = 0.0
    top_p: float = 0.1
    max_tokens: int = 1024
    json_mode: bool = True             # response_format={"type": "json_object"}
    max_retries: int = 8               # retries of the full prompt after its first attempt
    connect_retries: int = 2           # probes after a refused / unresolvable connection, then stop
    fallback_retries: int = 2          # retries of the count-only prompt
    backoff_s: float = 1.0             # sleep before retry r: backoff_s * 2**(r-1), capped
    backoff_max_s: float = 30.0
    timeout_s: float = 120.0
    concurrency: int = 4               # requests in flight
    cache_dir: str = ""                # "" = no cache

    def __post_init__(self):
        if self.passes < 1:
            raise ValueError(f"llm judge passes must be >= 1, got {self.passes}")
        if self.concurrency < 1:
            raise ValueError(f"llm judge concurrency must be >= 1, got {self.concurrency}")


class ResponseCache:
    """One JSON file per request key; holds the reply text only (no key, no endpoint)."""

    def __init__(self, directory: str):
        self.dir = pathlib.Path(directory) if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if not self.dir or not self._path(key).is_file():
            return None
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, content: str, meta: dict) -> None:
        if not self.dir:
            return
        write_json(self._path(key), {**meta, "content": content})


@dataclasses.dataclass
class PassResult:
    ok: bool = False
    kind: str = ""           # full | count
    counts: tuple = (0, 0, 0)
    lists: dict | None = None
    errors: list = dataclasses.field(default_factory=list)
    requests: int = 0
    cached: bool = False
    fatal: bool = False      # a non-retryable API error (e.g. 401): no fallback either


def _retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return True  # connection errors, timeouts, unparsable replies


def _cannot_connect(err: Exception) -> bool:
    """No connection at all (refused, unknown host, unreachable network); not a timeout, which
    keeps the retry policy. The HTTP library (httpx or httpx2, by openai version) raises a
    `ConnectError` under openai's APIConnectionError."""
    import openai

    if not isinstance(err, openai.APIConnectionError) or isinstance(err, openai.APITimeoutError):
        return False
    cause = err.__cause__
    while cause is not None:
        if type(cause).__name__ == "ConnectError" or isinstance(cause, ConnectionRefusedError | socket.gaierror):
            return True
        cause = cause.__cause__
    return False


def median_pass(results: list[list[PassResult]]) -> int | None:
    """The pass whose run-level error count is the median of the passes' (lower middle for an even
    count, ties to the lower index): the paper's "7 passes, report the median". The denominator
    (all events) is the same for every pass; a video whose pass p failed counts in pass p with the
    per-category median of its passes that succeeded (a video with none counts nowhere)."""
    passes = len(results[0]) if results else 0
    if not passes:
        return None
    totals = []
    for p in range(passes):
        total = 0.0
        for video in results:
            ok = [r.counts for r in video if r.ok]
            if ok:
                total += float(np.sum(video[p].counts if video[p].ok else np.median(np.array(ok, float), axis=0)))
        totals.append(total)
    return sorted(range(passes), key=lambda p: (totals[p], p))[(passes - 1) // 2]


class LlmJudge(Judge):
    name = "llm"

    def __init__(self, options: LlmOptions | None = None, client=None):
        self.options = options or LlmOptions()
        self.cache = ResponseCache(self.options.cache_dir)
        self._client = client
        self._lock = threading.Lock()
        self._unavailable: JudgeUnavailable | None = None   # set once: every later request stops
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "fallback_passes": 0,
                      "failed_passes": 0}

    @classmethod
    def from_config(cls, config=None, client=None, **overrides) -> LlmJudge:
        return cls(options_from_config(LlmOptions, config, "llm", **overrides), client=client)

    # ---- secrets ----
    def _api_key(self) -> str:
        for name in self.options.api_key_env.split(","):
            value = os.environ.get(name.strip(), "")
            if value:
                return value
        return ""

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _get_client(self):
        with self._lock:
            if self._client is None:
                import openai

                key = self._api_key()
                if not key:
                    log.warning("llm judge: none of %s is set; sending no API key",
                                self.options.api_key_env)
                self._client = openai.OpenAI(api_key=key or "none", base_url=self.options.base_url or None,
                                             max_retries=0, timeout=self.options.timeout_s)
            return self._client

    def endpoint(self) -> str:
        """The URL the requests go to, as the client resolved it (eval.llm_base_url, else the
        client's default: OPENAI_BASE_URL or api.openai.com)."""
        return str(getattr(self._get_client(), "base_url", "") or self.options.base_url)

    def _endpoint_key(self) -> str:
        """The endpoint part of the cache keys: eval.llm_base_url as given; unset, OPENAI_BASE_URL
        (the client's choice, so another server of the same model name never shares answers), and
        "" for the client's own default (the keys caches written before hold)."""
        return self.options.base_url or os.environ.get("OPENAI_BASE_URL", "")

    # ---- one request ----
    def _cache_key(self, messages: list[dict], seed: int) -> str:
        o = self.options
        blob = json.dumps({"v": PROMPT_VERSION, "base_url": self._endpoint_key(), "model": o.model,
                           "messages": messages, "temperature": o.temperature, "top_p": o.top_p,
                           "max_tokens": o.max_tokens, "json_mode": o.json_mode, "seed": seed},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request(self, messages: list[dict], seed: int) -> str:
        o = self.options
        kwargs = dict(model=o.model, messages=messages, temperature=o.temperature, top_p=o.top_p,
                      seed=seed, max_tokens=o.max_tokens)
        if o.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        with self._lock:
            self.stats["requests"] += 1
        response = self._get_client().chat.completions.create(**kwargs)
        return response.choices[0].message.content or ""

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _from_cache(self, result: PassResult, messages, seed, parser) -> dict | None:
        cached = self.cache.get(self._cache_key(messages, seed))
        if cached is None:
            return None
        try:
            parsed = parser(cached)
        except ValueError:
            return None
        self._count("cache_hits")
        result.cached = True
        return parsed

    def _unreachable(self, err: Exception, attempts: int) -> JudgeUnavailable:
        url = self.endpoint()
        with self._lock:
            if self._unavailable is None:
                cause = f"{type(err.__cause__).__name__}: {err.__cause__}" if err.__cause__ else str(err)
                self._unavailable = JudgeUnavailable(self._redact(
                    f"llm judge: cannot connect to {url} ({cause}; {attempts} attempts): check "
                    "eval.llm_base_url and the network; nothing was scored"))
            return self._unavailable

    def _ask(self, result: PassResult, messages, seed, parser, retries, label) -> dict | None:
        """`messages` until a reply parses: API errors resend the request; a reply that does not
        parse is retried with its parse error as a follow-up (llm_prompt.retry_messages). Only
        consecutive refused connections (1 + connect_retries) stop the run; a refusal after the
        server was reached, with the retries spent, fails this prompt only."""
        refused, reached, asked = 0, False, messages
        for attempt in itertools.count():
            if self._unavailable is not None:
                raise self._unavailable
            if attempt:
                self._count("retries")
                time.sleep(min(self.options.backoff_max_s, self.options.backoff_s * 2 ** (attempt - 1)))
            result.requests += 1
            content = None
            try:
                content = self._request(asked, seed)
                parsed = parser(content)
            except Exception as err:  # API errors and unparsable replies alike: record, maybe retry
                message = self._redact(f"{label} attempt {attempt + 1}: {type(err).__name__}: {err}")
                result.errors.append(message[:300])
                log.warning("llm judge: %s", message[:300])
                refused = refused + 1 if _cannot_connect(err) else 0
                reached = reached or not refused
                if refused > self.options.connect_retries:
                    raise self._unreachable(err, refused) from err
                if not _retryable(err):
                    result.fatal = True
                    return None
                if attempt >= retries and reached:
                    return None
                if content is not None:   # the server answered; tell it why its reply was unusable
                    asked = retry_messages(messages, content, self._redact(str(err)))
                continue
            self.cache.put(self._cache_key(messages, seed), content,
                           {"model": self.options.model, "seed": seed, "prompt": label,
                            "version": PROMPT_VERSION})
            return parsed

    def run_pass(self, caption: str, events: Sequence, pass_index: int) -> PassResult:
        """One pass: the full prompt (with retries), else the count-only prompt; cache first.

        A cached count-only reply means an earlier run already exhausted the full prompt, so a
        rerun takes it without asking again.
        """
        seed, n = self.options.seed + pass_index, len(events)
        result = PassResult()
        full_msgs, count_msgs = build_messages(caption, events), build_messages(caption, events, True)
        full_parser, count_parser = (lambda c: parse_full(c, n)), (lambda c: parse_counts(c, n))
        full = self._from_cache(result, full_msgs, seed, full_parser)
        counts = None if full is not None else self._from_cache(result, count_msgs, seed, count_parser)
        if full is None and counts is None:
            full = self._ask(result, full_msgs, seed, full_parser, self.options.max_retries,
                             "full prompt")
            if full is None and not result.fatal:
                counts = self._ask(result, count_msgs, seed, count_parser,
                                   self.options.fallback_retries, "count-only prompt")
        if full is not None:
            result.ok, result.kind, result.lists = True, "full", full
            result.counts = (len(full["missed"]), len(full["incorrect"]), len(full["hallucinated"]))
        elif counts is not None:
            self._count("fallback_passes")
            result.ok, result.kind = True, "count"
            result.counts = (counts["missed"], counts["incorrect"], counts["hallucinated"])
        else:
            self._count("failed_passes")
        return result

    # ---- a video from its passes ----
    def combine(self, video_id: str, events: Sequence, passes: list[PassResult],
                chosen: int | None = None) -> VideoScore:
        """A video's score from pass `chosen` (the run's median pass), else (that pass failed, or
        none chosen) the per-category median of its passes that succeeded."""
        ok = [p for p in passes if p.ok]
        details = {"passes": len(passes), "passes_ok": len(ok), "median_pass": chosen,
                   "fallback_passes": sum(p.kind == "count" for p in ok),
                   "cached_passes": sum(p.cached for p in ok),
                   "requests": sum(p.requests for p in passes),
                   "pass_counts": [list(p.counts) if p.ok else None for p in passes],
                   "errors": [e for p in passes for e in p.errors]}
        if not ok:
            last = details["errors"][-1] if details["errors"] else "no reply"
            return VideoScore(id=video_id, num_events=len(events), failed=True,
                              error=f"all {len(passes)} passes failed; last error: {last}", details=details)
        if chosen is not None and passes[chosen].ok:
            counts = np.array(passes[chosen].counts, float)
            full = [passes[chosen]] if passes[chosen].kind == "full" else []
        else:
            counts = np.median(np.array([p.counts for p in ok], float), axis=0)  # [3]
            full = [p for p in ok if p.kind == "full"]
            details["median_pass"] = None
        m, i, h = (float(c) if c != int(c) else int(c) for c in counts)
        score = VideoScore(id=video_id, num_events=len(events), missed=m, incorrect=i, hallucinated=h,
                           details=details)
        if full:  # lists from that pass, else the full pass whose counts are closest to the medians
            rep = min(full, key=lambda p: float(np.abs(np.array(p.counts) - counts).sum()))
            texts = [event_text(e) for e in events]
            labels = ["correct"] * len(events)
            for index in rep.lists["missed"]:
                labels[index] = "missed"
            for index in rep.lists["incorrect"]:
                labels[index] = "incorrect"
            score.missed_events = [texts[j] for j in rep.lists["missed"]]
            score.incorrect_events = [{"event": texts[j], "caption": ""} for j in rep.lists["incorrect"]]
            score.hallucinated_sentences = list(rep.lists["hallucinated"])
            score.event_labels = labels
        return score

    def score_many(self, pairs, ids=None) -> list[VideoScore]:
        ids = check_pairs(pairs, ids)
        passes = self.options.passes
        results: list[list[PassResult | None]] = [[None] * passes for _ in pairs]

        def task(v: int, p: int) -> PassResult:
            try:
                return self.run_pass(pairs[v][0], pairs[v][1], p)
            except JudgeUnavailable:
                raise
            except Exception as err:  # a bug must not lose the sample: it becomes a failed pass
                self._count("failed_passes")
                return PassResult(errors=[self._redact(f"{type(err).__name__}: {err}")[:300]])

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            futures = {pool.submit(task, v, p): (v, p) for v in range(len(pairs)) for p in range(passes)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    v, p = futures[future]
                    results[v][p] = future.result()
            except JudgeUnavailable:
                pool.shutdown(cancel_futures=True)
                raise
        chosen = median_pass(results)
        return [self.combine(video_id, events, results[v], chosen)
                for v, (video_id, (_, events)) in enumerate(zip(ids, pairs, strict=True))]

    def describe(self) -> dict:
        o = self.options
        return {"judge": self.name, "model": o.model, "base_url": self.endpoint(),
                "passes": o.passes, "seed": o.seed, "temperature": o.temperature, "top_p": o.top_p,
                "max_retries": o.max_retries, "fallback_retries": o.fallback_retries,
                "connect_retries": o.connect_retries,
                "prompt_version": PROMPT_VERSION, "stats": dict(self.stats)}
