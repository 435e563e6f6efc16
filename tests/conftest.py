"""Shared fixtures and builders: one local Ray for the whole session, the real HH rows in ../shared/data/, one
finished tests/tiny.yaml run for every test that reads or copies a run, the benchmark ingested with a tiny Llama
on its text, a recipe that crashes once, and a loopback OpenAI-compatible judge."""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from raybpo.config import Config, TinyModelConfig


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYBPO_SHARED_DATA", ROOT.parent / "shared" / "data"))
HH_TEST = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
TINY = Path(__file__).with_name("tiny.yaml")

# Set before anything imports raybpo (Hugging Face reads these at import); the builders below import it lazily.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One node, never preempted: no preemption-watcher actor beside every Ray Train run (a process start each; Ray
# Train passes the variable on to its controller).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A real S3 API on loopback (moto's server mode, started by the `s3` fixture): its address and dummy keys are set
# before Ray starts, so its workers reach it as the driver does (pyarrow reads AWS_ENDPOINT_URL).
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
# Converted models (the bundled GGUF) go to a cache of this session, so every run converts for real; set before
# Ray starts so its workers share it.
if "RAYBPO_MODEL_CACHE" not in os.environ:
    os.environ["RAYBPO_MODEL_CACHE"] = tempfile.mkdtemp(prefix="raybpo-model-cache-")
    atexit.register(shutil.rmtree, os.environ["RAYBPO_MODEL_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def hh_path() -> Path:
    assert HH_TEST.exists(), (
        f"the real HH rows are expected at {HH_TEST} (shared/ beside the project, or RAYBPO_SHARED_DATA)"
    )
    return HH_TEST


@pytest.fixture(scope="session")
def hh_lines(hh_path: Path) -> list[str]:
    with gzip.open(hh_path, "rt", encoding="utf-8") as handle:
        return [line for line in handle.read().split("\n") if line.strip()]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray with 2 CPUs for every test that needs it (about 5 s to start)."""
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """The loopback S3 server with a fresh bucket: yields `s3://<bucket>`."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    try:
        # pyarrow reads AWS_ENDPOINT_URL for URIs (`from_uri`, as raybpo and Ray open them), not in this constructor
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("raybpo-test")
        yield "s3://raybpo-test"
    finally:
        server.stop()


# -- one finished tiny run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyRun:
    """The session's finished `raybpo run --config tests/tiny.yaml`: read it in place, `copy` it to change it."""

    path: Path
    seconds: float

    def copy(self, target: Path, *leave_out: str) -> Path:
        """A private copy without the top-level folders `leave_out` (stages, checkpoints, report). Plain copies,
        not hard links: Ray Train rewrites the state files of its runs under checkpoints/ in place."""
        top = str(self.path)
        shutil.copytree(self.path, target, ignore=lambda folder, names: leave_out if folder == top else ())
        return target


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory) -> TinyRun:
    """tests/tiny.yaml through `raybpo run` once per session: every stage, the report, on the session's Ray."""
    from raybpo.cli import main

    run = tmp_path_factory.mktemp("tiny") / "run"
    started = time.perf_counter()
    assert main(["run", "--config", str(TINY), "--run-dir", str(run)]) == 0
    return TinyRun(run, time.perf_counter() - started)


# -- builders ------------------------------------------------------------------------------------------------


def benchmark_with_tiny_llama(
    root: Path, tiny: TinyModelConfig, texts: tuple[str, ...] = ("prompt", "chosen"), seed: int = 0, **benchmark: Any
) -> tuple[Config, str]:
    """(config, model folder): the run dir `root/run` with the built-in benchmark ingested (`benchmark` overrides
    its section; on the session's Ray, `ray_session`), and a tiny Llama built on the ingested `texts` columns in
    `root/tiny`. The config's policy is left as it is."""
    from raybpo.artifacts import read_pairs
    from raybpo.config import Config
    from raybpo.models.tiny import build_tiny_model
    from raybpo.rundir import RunDir
    from raybpo.stages.ingest import ingest

    cfg = Config(run_dir=str(root / "run"), seed=seed)
    cfg.ingest.preset = "benchmark"
    cfg.benchmark = cfg.benchmark.model_copy(update=benchmark)
    ingest(cfg)
    pairs = read_pairs(RunDir(cfg.run_dir))
    model = build_tiny_model([text for column in texts for text in pairs[column]], tiny, root / "tiny", seed=0)
    return cfg, str(model)


class CrashOnce:
    """Mixed into a training recipe: rank 1 raises in its `crash_at`-th training loss call of the first attempt
    (a marker file remembers the attempt), so Ray Train restarts the group from its last checkpoint."""

    marker: Path
    crash_at: int

    def loss(self, model, rows, workers, training):
        self.calls = getattr(self, "calls", 0) + 1
        if training and workers.rank == 1 and self.calls == self.crash_at and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError("injected worker failure")
        return super().loss(model, rows, workers, training)


def _crash_once(make_recipe: Callable[..., Any], marker: str, crash_at: int, *args: Any) -> Any:
    recipe = make_recipe(*args)
    # A new instance of the mixed class with the recipe's state: Python refuses to assign `__class__` to this
    # class made by type() from the mixin and the recipe's class ("object layout differs").
    crashing = object.__new__(type(f"CrashOnce{type(recipe).__name__}", (CrashOnce, type(recipe)), {}))
    crashing.__dict__.update(vars(recipe))
    crashing.marker, crashing.crash_at = Path(marker), crash_at
    return crashing


def crash_once(make_recipe: Callable[..., Any], marker: str, crash_at: int, *args: Any) -> Callable[[], Any]:
    """A recipe factory for `fit`: `make_recipe(*args)` made a `CrashOnce` of its class, in the workers (this
    module is pickled by value: Ray's workers cannot import a conftest)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return functools.partial(_crash_once, make_recipe, marker, crash_at, *args)


class ChatCompletions(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible chat-completions endpoint: each POST is answered with the content
    `server.answer(user message)`; `send` and `answer` for handlers that misbehave on purpose."""

    server: JudgeServer

    def log_message(self, format: str, *args: object) -> None:  # keep the test output quiet
        pass

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def answer(self, content: str) -> None:
        self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.answer(self.server.answer(body["messages"][0]["content"]))


class JudgeServer(ThreadingHTTPServer):
    """A `ChatCompletions` server (or a subclass's) on a free loopback port."""

    def __init__(self, answer: Callable[[str], str] | None = None, handler: type = ChatCompletions) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.answer = answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@contextmanager
def serving(server: JudgeServer) -> Iterator[JudgeServer]:
    """Serve `server` from a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def judge_server() -> Callable[[Callable[[str], str]], Any]:
    """`with judge_server(answer) as url:` a loopback judge answering each user message with `answer(message)`."""

    @contextmanager
    def start(answer: Callable[[str], str]) -> Iterator[str]:
        with serving(JudgeServer(answer)) as server:
            yield server.url

    return start
