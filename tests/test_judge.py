"""The LLM judge client against a real loopback HTTP server that speaks chat-completions and misbehaves on purpose.

The server reads tags from the user message (the item's response text) and acts on them:
  [good:V]       answer V (default 5)                 [SSSxN]      status SSS for the first N attempts, then good
  [SSS]          status SSS always                    [malformed]  invalid JSON on the first attempt
  [nonnumeric]   always "Score: seven"                [nocontent]  always {"choices": []}
  [retryafter:S] 429 with Retry-After: S, first attempt  [redirect] 302 to another path
  [echokey]      content echoes the Authorization header  [chunked]  the answer in chunked transfer encoding
  [slow]         first attempt hangs (until teardown) past the client timeout;  [slowalways] every attempt does
  [drip]         first attempt: a 200 whose body trickles in, a byte per 0.1 s, far slower than the timeout
  [together]     waits (up to 2 s) until 4 requests are in flight; records the most ever in flight

The machine that runs the tests may be loaded, so timing checks are lower bounds (guaranteed by the client's
waits) or upper bounds far from the expected value; client timeouts are generous except where a test is about them.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import threading
import time
from collections import Counter

import pytest
from conftest import ChatCompletions, JudgeServer, serving

from raybpo.config import JudgeConfig
from raybpo.data.schema import canonical_prompt
from raybpo.scoring import JudgeClient, Judgement, parse_score
from raybpo.scoring.judge import RateLimiter, _parse_retry_after

SECRET = "sk-test-SECRET-123"
KEY_ENV = "RAYBPO_TEST_JUDGE_KEY"
TIMEOUT_S = 5.0  # generous: an ordinary request on a loaded machine must never time out
SHORT_TIMEOUT_S = 1.0  # for the tests about timeouts


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stop = threading.Event()  # set in teardown: hanging handlers return at once
        self.attempts: Counter[str] = Counter()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0


class _Handler(ChatCompletions):
    server: _Server

    def _drip(self) -> None:
        """A 200 whose body comes a byte per 0.1 s: each read is quick, the whole takes about 7 s."""
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "1"}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                if self.server.state.stop.wait(0.1):
                    return
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chunked(self, content: str) -> None:
        """A 200 in chunked transfer encoding, a few bytes a chunk."""
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        content = body["messages"][0]["content"]
        with state.lock:
            state.attempts[content] += 1
            n = state.attempts[content]
            state.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": body, "t": time.monotonic()}
            )
        if self.path != "/v1/chat/completions":
            return self.send(404, b'{"error": "not found"}')

        if "[together]" in content:
            with state.cond:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.cond.notify_all()
                state.cond.wait_for(lambda: state.in_flight >= 4 or state.stop.is_set(), timeout=2.0)
            time.sleep(0.05)  # let the others see the count before it drops
            with state.cond:
                state.in_flight -= 1
        if (m := re.search(r"\[(\d{3})x(\d+)\]", content)) and n <= int(m[2]):
            return self.send(int(m[1]), b'{"error": "try again"}')
        if m := re.search(r"\[(\d{3})\]", content):
            return self.send(int(m[1]), b'{"error": "no"}')
        if (m := re.search(r"\[retryafter:([\d.]+)\]", content)) and n == 1:
            return self.send(429, b'{"error": "slow down"}', {"Retry-After": m[1]})
        if "[redirect]" in content:
            return self.send(302, b"", {"Location": "/stolen"})
        if "[chunked]" in content:
            return self._chunked(re.search(r"\[good:([^\]]+)\]", content)[1])
        if "[drip]" in content and n == 1:
            return self._drip()
        if ("[slow]" in content and n == 1) or "[slowalways]" in content:
            state.stop.wait(30)
        if "[malformed]" in content and n == 1:
            return self.send(200, b'{"choices": [{"message": ')
        if "[nonnumeric]" in content:
            return self.answer("Score: seven")
        if "[nocontent]" in content:
            return self.send(200, b'{"choices": []}')
        if "[echokey]" in content:
            return self.answer(f"key {self.headers.get('Authorization')}")
        good = re.search(r"\[good:([^\]]+)\]", content)
        return self.answer(good[1] if good else "5")


class _Server(JudgeServer):
    daemon_threads = False  # handler threads are tracked, so server_close() joins them (teardown sets `stop` first)
    block_on_close = True

    def __init__(self) -> None:
        super().__init__(handler=_Handler)
        self.state = _State()


@pytest.fixture
def server():
    srv = _Server()
    with serving(srv):
        try:
            yield srv
        finally:
            srv.state.stop.set()
            with srv.state.cond:
                srv.state.cond.notify_all()


@pytest.fixture
def log_lines():
    """Every log record at DEBUG and above, formatted (works with and without pytest's logging plugin)."""
    lines: list[str] = []

    class _ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = _ListHandler(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _config(url: str, **overrides: object) -> JudgeConfig:
    settings: dict[str, object] = {
        "url": url,
        "model": "judge-test",
        "api_key_env": KEY_ENV,
        "concurrency": 4,
        "requests_per_second": 1000.0,
        "timeout_s": TIMEOUT_S,
        "max_retries": 3,
    }
    settings.update(overrides)
    return JudgeConfig(**settings)


def _client(url: str, backoff_s: float = 0.01, **overrides: object) -> JudgeClient:
    return JudgeClient(_config(url, **overrides), backoff_s=backoff_s, seed=0)


# Expected outcome per tag with max_retries=3 (4 attempts at most).
MIXED = [
    ("[good:7.5]", Judgement(7.5, None, 1)),
    ("[good:1]", Judgement(1.0, None, 1)),
    ("[good:10]", Judgement(10.0, None, 1)),
    ("[good: 8 \n]", Judgement(8.0, None, 1)),
    ("[429x2] [good:3]", Judgement(3.0, None, 3)),
    ("[500x1] [good:8]", Judgement(8.0, None, 2)),
    ("[503x3] [good:2]", Judgement(2.0, None, 4)),
    ("[502x1] [good:6.25]", Judgement(6.25, None, 2)),
    ("[malformed] [good:9]", Judgement(9.0, None, 2)),
    ("[nonnumeric]", Judgement(None, "unparseable_score: 'Score: seven'", 4)),
    ("[good:7/10]", Judgement(None, "unparseable_score: '7/10'", 4)),
    ("[good:11]", Judgement(None, "unparseable_score: '11'", 4)),
    ("[nocontent]", Judgement(None, "no_content", 4)),
    ("[429]", Judgement(None, "http_429", 4)),
    ("[500]", Judgement(None, "http_500", 4)),
    ("[401]", Judgement(None, "http_401", 1)),
    ("[400]", Judgement(None, "http_400", 1)),
    ("[404]", Judgement(None, "http_404", 1)),
    ("[redirect]", Judgement(None, "http_302", 1)),
    ("[500x4] [good:4]", Judgement(None, "http_500", 4)),
    ("[chunked] [good:4]", Judgement(4.0, None, 1)),
    ("plain answer", Judgement(5.0, None, 1)),
]


def test_mixed_items_scores_order_retries_and_quarantine(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = _client(server.url)
    items = [(f"prompt {i}", f"response {i} {tag}") for i, (tag, _) in enumerate(MIXED)]

    judgements = client.score_many(items)

    assert len(judgements) == len(items)
    for (tag, expected), got in zip(MIXED, judgements, strict=True):
        assert got == expected, tag
    # the server saw exactly as many requests per item as the judgement says
    for (prompt, response), got in zip(items, judgements, strict=True):
        assert server.state.attempts[client.cfg.prompt.format(prompt=prompt, response=response)] == got.attempts
    assert len(server.state.requests) == sum(j.attempts for j in judgements)
    assert all(r["path"] == "/v1/chat/completions" for r in server.state.requests)  # the redirect was not followed


def test_request_format(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = _client(server.url)
    assert client.score_many([("What is 2+2?", "4 [good:9]")]) == [Judgement(9.0, None, 1)]
    (request,) = server.state.requests
    assert request["path"] == "/v1/chat/completions"
    content = client.cfg.prompt.format(prompt="What is 2+2?", response="4 [good:9]")
    message = {"role": "user", "content": content}
    assert request["body"] == {"model": "judge-test", "messages": [message], "temperature": 0}
    assert "Prompt:\nWhat is 2+2?" in request["body"]["messages"][0]["content"]
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_chat_prompts_reach_the_judge_as_the_hh_transcript(server):
    client = _client(server.url)
    chat = canonical_prompt([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Why?"}])
    assert client.score_many([(chat, "4 [good:9]")]) == [Judgement(9.0, None, 1)]
    content = server.state.requests[0]["body"]["messages"][0]["content"]
    assert "Prompt:\n\n\nHuman: What is 2+2?\n\nAssistant: Why?\n\nAssistant:\n\nResponse:\n4 [good:9]" in content


def test_timeouts_are_retried_then_quarantined(server):
    client = _client(server.url, timeout_s=SHORT_TIMEOUT_S, max_retries=1)
    started = time.monotonic()
    slow, always = client.score_many([("p", "[slow] [good:6]"), ("p", "[slowalways]")])
    elapsed = time.monotonic() - started
    # the first attempt of [slow] hangs: it times out and the retry scores it (a retry can time out
    # too on a badly loaded machine, hence >= 2)
    assert slow.score == 6.0 and slow.reason is None and slow.attempts >= 2
    assert always == Judgement(None, "timeout", 2)
    assert server.state.attempts[client.cfg.prompt.format(prompt="p", response="[slowalways]")] == 2
    assert elapsed >= 2 * SHORT_TIMEOUT_S * 0.9  # two attempts of [slowalways], each cut at the timeout
    assert elapsed < 15  # the server would hang for 30 s per attempt


def test_drip_fed_body_times_out(server):
    # the body arrives a byte per 0.1 s (about 7 s in all): every read beats the timeout, the whole does not
    client = _client(server.url, timeout_s=SHORT_TIMEOUT_S)
    started = time.monotonic()
    (judgement,) = client.score_many([("p", "[drip] [good:7]")])
    assert judgement.score == 7.0 and judgement.attempts >= 2
    assert time.monotonic() - started < 5


def test_concurrency_is_used_and_bounded(server):
    client = _client(server.url, concurrency=4)
    judgements = client.score_many([("p", f"r{i} [together] [good:{i + 1}]") for i in range(8)])
    assert [j.score for j in judgements] == [float(i + 1) for i in range(8)]
    assert server.state.max_in_flight == 4  # 4 workers: 4 requests at once, never more


def test_rate_limit_holds(server):
    client = _client(server.url, requests_per_second=20.0, concurrency=4)
    started = time.monotonic()
    judgements = client.score_many([("p", f"r{i}") for i in range(10)])
    elapsed = time.monotonic() - started
    assert judgements == [Judgement(5.0, None, 1)] * 10
    assert elapsed >= 0.4  # 10 starts at least 1/20 s apart: the last starts 0.45 s after the first


def test_rate_limit_covers_retries(server):
    client = _client(server.url, requests_per_second=10.0, concurrency=4, max_retries=4)
    started = time.monotonic()
    (judgement,) = client.score_many([("p", "[500x4] [good:3]")])
    assert judgement == Judgement(3.0, None, 5)
    assert time.monotonic() - started >= 0.35  # 5 starts 0.1 s apart, however short the back-off


def test_rate_limiter_is_shared_by_threads():
    limiter = RateLimiter(50.0)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [limiter.acquire() for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 19 / 50 - 0.01  # 20 starts, 1/50 s apart


def test_retry_after_is_honoured(server):
    client = _client(server.url)
    (judgement,) = client.score_many([("p", "[retryafter:1] [good:4]")])
    assert judgement == Judgement(4.0, None, 2)
    first, second = (r["t"] for r in server.state.requests)
    assert second - first >= 0.95  # not the 0.01 s back-off


def test_retry_after_is_capped(server):
    client = JudgeClient(_config(server.url), backoff_s=0.01, max_retry_after_s=0.2)
    started = time.monotonic()
    (judgement,) = client.score_many([("p", "[retryafter:30] [good:4]")])
    assert judgement == Judgement(4.0, None, 2)
    assert time.monotonic() - started < 10


def test_backoff_grows_exponentially(server):
    client = _client(server.url, backoff_s=0.1, max_retries=3)
    (judgement,) = client.score_many([("p", "[500]")])
    assert judgement == Judgement(None, "http_500", 4)
    times = [r["t"] for r in server.state.requests]
    # retry k waits at least 0.1 * 2**k / 2: 0.05, 0.1, 0.2 s
    for k, (a, b) in enumerate(itertools.pairwise(times)):
        assert b - a >= 0.1 * 2**k / 2 - 0.005, (k, times)
    # and at most 0.1 * 2**k, capped at max_backoff_s
    for k in range(8):
        delays = [client._backoff(k) for _ in range(200)]
        ceiling = min(client.max_backoff_s, 0.1 * 2**k)
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered


def test_connection_error_is_retried_then_quarantined():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}/v1", max_retries=2)
    assert client.score_many([("p", "r"), ("p", "s")]) == [Judgement(None, "connection_error", 3)] * 2


def test_key_from_env_is_sent_and_never_logged(server, monkeypatch, log_lines):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = _client(server.url, max_retries=1)
    tags = ("[good:7]", "[500x1]", "[401]", "[nonnumeric]", "[429]", "[malformed]", "[echokey]")
    judgements = client.score_many([("p", t) for t in tags])

    assert [j.score for j in judgements] == [7.0, 5.0, None, None, None, 5.0, None]
    assert {r["headers"]["Authorization"] for r in server.state.requests} == {f"Bearer {SECRET}"}
    # the server echoed the key in its answer: the stored reason has it redacted
    assert judgements[-1] == Judgement(None, "unparseable_score: 'key Bearer ***'", 2)
    # the logs say what happened (URL and status) ...
    text = "\n".join(log_lines)
    for expected in ("http_500", "http_401", "http_429", "malformed_json", "unparseable_score", server.url):
        assert expected in text
    # ... and never carry the key
    assert SECRET not in text
    assert all(SECRET not in repr(j) for j in judgements)
    assert SECRET not in repr(client)


def test_missing_key_variable_sends_no_authorization(server, monkeypatch, log_lines):
    monkeypatch.delenv(KEY_ENV, raising=False)
    client = _client(server.url)
    assert client.score_many([("p", "[good:2]")]) == [Judgement(2.0, None, 1)]
    assert "Authorization" not in server.state.requests[0]["headers"]
    warnings = [line for line in log_lines if line.startswith("WARNING") and KEY_ENV in line]
    assert len(warnings) == 1


def test_explicit_key_overrides_env(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = JudgeClient(_config(server.url), api_key="sk-other-456")
    client.score_many([("p", "r")])
    assert server.state.requests[0]["headers"]["Authorization"] == "Bearer sk-other-456"


def test_bad_key_is_rejected_without_echoing_it(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-bad-KEY\r\nX-Injected: 1")
    with pytest.raises(ValueError, match=KEY_ENV) as info:
        JudgeClient(_config("http://127.0.0.1:9/v1"))
    assert "sk-bad-KEY" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"prompt": "Rate {response} given {context}"}, "context"),
        ({"prompt": "Rate {prompt} only"}, "response"),
        ({"prompt": "Rate {response} {"}, "format string"),
        ({"url": "file:///etc/passwd"}, "http"),
        ({"url": "127.0.0.1:8000"}, "http"),
    ],
)
def test_config_is_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        JudgeClient(_config(**{"url": "http://127.0.0.1:9/v1", **overrides}))


def test_literal_braces_and_braces_in_text(server):
    client = _client(server.url, prompt='Answer as {{"score": n}}? No: the number only.\n{prompt}\n{response}')
    assert client.score_many([("{x}", "{response} [good:3]")]) == [Judgement(3.0, None, 1)]
    content = server.state.requests[0]["body"]["messages"][0]["content"]
    assert content == 'Answer as {"score": n}? No: the number only.\n{x}\n{response} [good:3]'


def test_empty_input_and_zero_retries(server):
    assert _client(server.url).score_many([]) == []
    client = _client(server.url, max_retries=0)
    assert client.score_many([("p", "[500x1]"), ("p", "[good:6]")]) == [
        Judgement(None, "http_500", 1),
        Judgement(6.0, None, 1),
    ]


def test_malformed_item_is_quarantined_not_lost(server):
    client = _client(server.url)
    judgements = client.score_many([("p", "[good:3]"), ("only one field",), ("p", "[good:4]")])  # type: ignore[list-item]
    assert judgements[0] == Judgement(3.0, None, 1)
    assert judgements[1].score is None and judgements[1].reason.startswith("internal_error")
    assert judgements[2] == Judgement(4.0, None, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 7.0), ("7.5", 7.5), (" 8 \n", 8.0), ("+3", 3.0), ("1", 1.0), ("10", 10.0), ("10.0", 10.0), ("09", 9.0)],
)
def test_parse_score_accepts(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    ["7/10", "Score: 7", "seven", "", "   ", "11", "0", "0.99", "10.01", "-1", "7.", ".5", "1e1", "nan", "inf",
     "7 8", "7\n8", "1_0", "\u0667", "7!", "**7**", "[7]"],
)  # fmt: skip
def test_parse_score_rejects(text):
    with pytest.raises(ValueError):
        parse_score(text)


def test_parse_score_range_is_configurable():
    assert parse_score("-1", low=-1, high=1) == -1.0
    assert parse_score("0.5", low=0, high=1) == 0.5
    with pytest.raises(ValueError):
        parse_score("2", low=0, high=1)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("1", 1.0), ("0.5", 0.5), ("-3", 0.0), ("abc", None), ("nan", None), ("", None), (None, None),
     ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0)],
)  # fmt: skip
def test_parse_retry_after(header, expected):
    assert _parse_retry_after(header) == expected
