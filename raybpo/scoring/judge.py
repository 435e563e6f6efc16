"""An LLM judge at an OpenAI-compatible URL: one scalar score per (prompt, response).

    client = JudgeClient(cfg.score.judge)
    judgements = client.score_many([(prompt, response), ...])   # same order as the input

Each item becomes one chat-completions request, `POST {url}/chat/completions` with
`{"model": ..., "messages": [{"role": "user", "content": prompt}], "temperature": 0}`, where the
user message is `cfg.prompt` with its `{prompt}` and `{response}` placeholders filled in (a chat
prompt fills `{prompt}` as its HH transcript, `plain_prompt`).

Behaviour (settings from `raybpo.config.JudgeConfig`):
- Concurrency: `concurrency` worker threads; a rate limiter shared by all of them (and by every
  `score_many` call on the same client) starts at most `requests_per_second` requests per second,
  evenly spaced, retries included.
- Timeouts: `timeout_s` bounds connecting, each socket read, and reading the body as a whole.
- Retries: up to `max_retries` more attempts, with exponential back-off plus jitter, after a 408,
  429 or 5xx answer, a timeout, a connection error, a body that is not JSON (`malformed_json`),
  a body without `choices[0].message.content` (`no_content`), or content that is not a valid score
  (`unparseable_score: '<first 40 characters>'`). A `Retry-After` header on 429 or 503 replaces the
  back-off, capped at `max_retry_after_s`. Other answers (400, 401, 403, 404, redirects, ...) are
  not retried: the item is quarantined at once with the reason `http_<status>`. Redirects are
  never followed, so the key is only ever sent to the configured host.
- Quarantine: an item that fails for good gets `Judgement(score=None, reason=<last failure>)`; no
  item is dropped, `score_many` returns exactly one judgement per input item.
- Scores are parsed strictly (`parse_score`): the content, stripped of surrounding whitespace,
  must be exactly one plain number inside the score range (default [1, 10]). The config's prompt
  asks the judge for "the number only"; "7/10", "Score: 7" or "seven" are failures, not guesses.
- The API key comes from the environment variable named by `api_key_env` (or the `api_key`
  argument) and is sent as `Authorization: Bearer <key>`. It is never logged and never stored in a
  judgement: log lines name the URL, the status and the variable, never its value, and every
  message that comes from outside is passed through a redaction of the key. If the variable is
  unset, requests carry no Authorization header (a local server usually needs none) and one
  warning names the variable.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import re
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from raybpo.config import JudgeConfig
from raybpo.data.schema import plain_prompt

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
"""A chat-completions answer larger than this is treated as malformed."""

_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?", re.ASCII)
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_RETRYABLE_STATUS = frozenset({408, 429})
_RETRY_AFTER_STATUS = frozenset({429, 503})


def parse_score(text: str, low: float = 1, high: float = 10) -> float:
    """The score in a judge's answer, parsed strictly.

    `text`, stripped of surrounding whitespace, must be exactly one number: optional sign, ASCII
    digits, optional decimal part ("7", "-1", "7.5", " 8 \\n"), and lie within [low, high].
    Anything else ("7/10", "Score: 7", "seven", "", "1e1", "nan", "7.", out-of-range values)
    raises ValueError.
    """
    if not isinstance(text, str):
        raise ValueError(f"the score is not text but {type(text).__name__}")
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        raise ValueError(f"not a single number: {stripped[:40]!r}")
    value = float(stripped)
    if not low <= value <= high:
        raise ValueError(f"score {value:g} outside [{low:g}, {high:g}]")
    return value


@dataclass(frozen=True)
class Judgement:
    """One item's outcome: a score, or None and the reason it was quarantined; `attempts` = requests sent."""

    score: float | None
    reason: str | None
    attempts: int


class RateLimiter:
    """At most `rate` starts per second, evenly spaced (1 / rate apart, no bursts); thread-safe."""

    def __init__(self, rate: float):
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self._interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until this caller may start; returns the seconds waited."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        wait = start - now
        if wait > 0:
            time.sleep(wait)
        return wait


class _AttemptError(Exception):
    """One failed attempt: its reason, whether to try again, and a server-requested delay."""

    def __init__(self, reason: str, retryable: bool = True, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a 3xx answer becomes an HTTPError, and the key never reaches another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl) -> None:  # type: ignore[override]
        return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, decimals accepted, or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class JudgeClient:
    """Scores (prompt, response) pairs with an LLM judge at `cfg.url` (see the module docstring).

    `api_key` overrides the environment variable `cfg.api_key_env`. `backoff_s` is the base of the
    exponential back-off (retry k waits about backoff_s * 2**k, jittered, at most `max_backoff_s`);
    `max_retry_after_s` caps a server's Retry-After; `score_range` is the accepted [low, high].
    """

    def __init__(
        self,
        cfg: JudgeConfig,
        api_key: str | None = None,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 60.0,
        score_range: tuple[float, float] = (1.0, 10.0),
        seed: int | None = None,
    ):
        self.cfg = cfg
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.low, self.high = (float(v) for v in score_range)
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff_s, max_backoff_s and max_retry_after_s must be >= 0")
        if not self.low <= self.high:
            raise ValueError(f"score_range must be (low, high) with low <= high, got {score_range}")
        _check_prompt(cfg.prompt)

        parsed = urllib.parse.urlsplit(cfg.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"judge.url must be an http:// or https:// URL, got {cfg.url!r}")
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"

        key = api_key if api_key is not None else os.environ.get(cfg.api_key_env)
        key = key.strip() if key else None
        self._key = key or None
        if self._key is not None and not _HEADER_SAFE.fullmatch(self._key):
            # Say where the key came from, never what it is.
            source = "the api_key argument" if api_key is not None else f"the environment variable {cfg.api_key_env}"
            raise ValueError(f"the judge API key from {source} has characters not allowed in an HTTP header")
        if self._key is None:
            log.warning(
                "judge: environment variable %s is not set; requests to %s carry no Authorization header",
                cfg.api_key_env,
                cfg.url,
            )

        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "raybpo-judge"}
        if self._key is not None:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._limiter = RateLimiter(cfg.requests_per_second)
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        key = "set" if self._key else "unset"
        return f"JudgeClient(url={self.cfg.url!r}, model={self.cfg.model!r}, key={key})"

    def score_many(self, items: Sequence[tuple[str, str]]) -> list[Judgement]:
        """One judgement per (prompt, response) item, in input order; failures are quarantined, never dropped."""
        if not items:
            return []
        workers = min(self.cfg.concurrency, len(items))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raybpo-judge") as pool:
            judgements = list(pool.map(self._judge_safely, items))
        failed = Counter(j.reason.split(":", 1)[0] for j in judgements if j.reason is not None)
        log.info(
            "judge %s: %d items, %d scored, %d quarantined%s",
            self.endpoint,
            len(judgements),
            len(judgements) - sum(failed.values()),
            sum(failed.values()),
            f" {dict(failed)}" if failed else "",
        )
        return judgements

    # -- internals ---------------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _judge_safely(self, item: tuple[str, str]) -> Judgement:
        try:
            prompt, response = item
            return self._judge(prompt, response)
        except Exception as err:  # a bug must not lose the row: quarantine it with the error's type
            log.warning("judge %s: internal error %s; the item is quarantined", self.endpoint, type(err).__name__)
            return Judgement(None, f"internal_error: {type(err).__name__}", 0)

    def _judge(self, prompt: str, response: str) -> Judgement:
        content = self.cfg.prompt.format(prompt=plain_prompt(prompt), response=response)
        payload = json.dumps(
            {"model": self.cfg.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        ).encode("utf-8")
        total = self.cfg.max_retries + 1
        reason = "no_attempt"
        for attempt in range(1, total + 1):
            self._limiter.acquire()
            try:
                return Judgement(self._attempt(payload), None, attempt)
            except _AttemptError as err:
                reason = self._redact(err.reason)
                if not err.retryable:
                    log.warning("judge %s: %s, not retried; the item is quarantined", self.endpoint, reason)
                    return Judgement(None, reason, attempt)
                if attempt == total:
                    break
                if err.retry_after is not None:
                    delay = min(err.retry_after, self.max_retry_after_s)
                else:
                    delay = self._backoff(attempt - 1)
                log.info(
                    "judge %s: %s (attempt %d of %d); retrying in %.2f s", self.endpoint, reason, attempt, total, delay
                )
                time.sleep(delay)
        log.warning("judge %s: %s after %d attempts; the item is quarantined", self.endpoint, reason, total)
        return Judgement(None, reason, total)

    def _backoff(self, retry: int) -> float:
        """Exponential back-off with "equal jitter": uniform in [c/2, c], c = min(max, base * 2**retry)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0**retry)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _attempt(self, payload: bytes) -> float:
        """One request; the score, or _AttemptError with the reason."""
        request = urllib.request.Request(self.endpoint, data=payload, headers=self._headers, method="POST")
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            with self._opener.open(request, timeout=self.cfg.timeout_s) as answer:
                raw = _read_body(answer, deadline)
        except urllib.error.HTTPError as err:
            status = err.code
            retry_after = _parse_retry_after(err.headers.get("Retry-After")) if status in _RETRY_AFTER_STATUS else None
            err.close()
            retryable = status in _RETRYABLE_STATUS or 500 <= status <= 599
            raise _AttemptError(f"http_{status}", retryable, retry_after) from None
        except TimeoutError:
            raise _AttemptError("timeout") from None
        except urllib.error.URLError as err:
            raise _AttemptError("timeout" if isinstance(err.reason, TimeoutError) else "connection_error") from None
        except (http.client.HTTPException, OSError):
            raise _AttemptError("connection_error") from None

        try:
            data = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise _AttemptError("malformed_json") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _AttemptError("no_content") from None
        if not isinstance(content, str):
            raise _AttemptError("no_content")
        try:
            return parse_score(content, self.low, self.high)
        except ValueError:
            raise _AttemptError(f"unparseable_score: {content.strip()[:40]!r}") from None


def _read_body(answer: http.client.HTTPResponse, deadline: float) -> bytes:
    """The whole body, within the deadline (a server that drip-feeds bytes times out) and MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        chunk = answer.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _AttemptError("malformed_json")
        chunks.append(chunk)


def _check_prompt(prompt: str) -> None:
    """The judge prompt must have a {response} placeholder and no placeholders other than {prompt}/{response}."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as err:
        msg = f"judge.prompt is not a valid format string ({err}); write literal braces as {{{{ }}}}"
        raise ValueError(msg) from None
    unknown = fields - {"prompt", "response"}
    if unknown:
        raise ValueError(
            f"judge.prompt may use only the {{prompt}} and {{response}} placeholders, found {sorted(unknown)}; "
            "write literal braces as {{ }}"
        )
    if "response" not in fields:
        raise ValueError("judge.prompt must contain the {response} placeholder")
