"""Cluster use: cluster.yaml against the Ray autoscaler's schema, jobs/configs against raybpo's config,
the jobs/ entrypoints, and a real `ray job submit` of the pipeline to a 3-node cluster on loopback with its run
directory on S3, one worker node preempted and killed during train.

Each node is a `ray start --block` in its own session, temp dir and ports, stopped by signalling that session
only: `ray stop` would kill every Ray on the machine, the test session's included. The worker nodes run in
private mount namespaces (`unshare --mount`, as root), so that what one node writes to /tmp the others do not see.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raybpo.artifacts import CHECKPOINTS, DEPTH, EVALUATE, TRAIN
from raybpo.config import load_config
from raybpo.rundir import COMPLETE, MANIFEST, RunDir
from raybpo.train.checkpoint import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
# jobs/ entrypoint -> the raybpo command it runs.
ENTRYPOINTS = {
    "run_pipeline.py": "run",
    "run_tune.py": "tune",
    "run_evaluate.py": "evaluate",
    "run_report.py": "report",
}
# The whole stage graph on a tiny built-in benchmark (tests/tiny.yaml: 3 sources x 40 pairs).
TINY = ROOT / "tests" / "tiny.yaml"
TINY_RUN = ["--config", "tests/tiny.yaml"]
TINY_STAGES = load_config(TINY).stages
# On the cluster only: the actor pools autoscale (1 to 2 actors); the results must not change.
AUTOSCALING_POOLS = [f"{section}.concurrency=[1,2]" for section in ("breadth", "generate", "depth")]


# ----------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _workers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def _is_gpu(node_type: dict[str, Any]) -> bool:
    """AWS GPU instance families start with g or p (g5, g6e, p4d, p5, ...)."""
    return node_type["node_config"]["InstanceType"][0] in "gp"


def _is_spot(node_type: dict[str, Any]) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_cluster_yaml_passes_the_autoscaler_schema(cluster_yaml):
    """Against the schema Ray publishes with the launcher (`ray/autoscaler/ray-schema.json`), as `ray up` checks."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_yaml, schema)
    broken = {**cluster_yaml, "available_node_types": {"head": {"resources": {}}}}  # no node_config
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_has_a_cpu_free_head_and_scale_to_zero_gpu_workers_on_demand_and_spot(cluster_yaml):
    head = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and not _is_spot(head)
    gpus = {name: t for name, t in _workers(cluster_yaml).items() if _is_gpu(t)}
    assert gpus and all(t["min_workers"] == 0 for t in gpus.values())
    assert any(_is_spot(t) for t in gpus.values())
    on_demand = [t for t in gpus.values() if not _is_spot(t)]
    assert on_demand and all(t["resources"].get("on_demand", 0) >= 1 for t in on_demand)
    assert not any(t["resources"].get("on_demand") for t in _workers(cluster_yaml).values() if _is_spot(t))


def test_every_node_boots_a_current_nvidia_driver_ami_not_the_launchers_cuda_11_default(cluster_yaml):
    """Without an ImageId the launcher boots its old Ubuntu 18.04 Deep Learning AMI (a CUDA 11 driver)."""
    dlami = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"
    images = {name: t["node_config"].get("ImageId", "") for name, t in cluster_yaml["available_node_types"].items()}
    assert all(image.startswith(dlami) for image in images.values()), images


def test_cluster_installs_torch_then_raybpo_gpu_and_starts_ray_with_token_auth(cluster_yaml):
    setup = cluster_yaml["setup_commands"]
    torch_at = next(i for i, cmd in enumerate(setup) if "pip install" in cmd and "torch==2.13.0" in cmd)
    raybpo_at = next(i for i, cmd in enumerate(setup) if re.search(r"pip install .*raybpo\[gpu", cmd))
    assert torch_at < raybpo_at
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster_yaml[key] if "ray start" in cmd)
        assert "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in cluster_yaml["file_mounts"]


# ----------------------------------------------------------------------------- jobs/


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_config_is_valid_and_its_local_sources_exist(path: Path):
    cfg = load_config(path)
    for source in cfg.ingest.sources:
        if source.path.startswith((".", "/")):
            assert (ROOT / source.path).exists(), f"{path.name}: {source.path} (relative to the working dir)"


def test_every_job_entrypoint_is_tested():
    assert {p.name for p in (ROOT / "jobs").glob("*.py")} == set(ENTRYPOINTS)


@pytest.mark.parametrize(("name", "command"), ENTRYPOINTS.items())
def test_job_entrypoint_runs_its_raybpo_command(name: str, command: str, monkeypatch, capsys):
    path = ROOT / "jobs" / name
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: raybpo {command} ")


# ----------------------------------------------------------------------------- a 3-node cluster on S3


@dataclass
class Cluster:
    """A running cluster: the head's Jobs API URL, GCS address and token, the environment its processes got, its
    temp dir, and the `ray start --block` process of each worker node (each in its own mount namespace)."""

    url: str
    gcs: str
    token: str
    env: dict[str, str]
    temp_dir: Path
    workers: list[subprocess.Popen]

    def ray(self, *args: str, timeout: float = 60) -> str:
        """The stdout of a `ray` CLI command against this cluster (with its token)."""
        done = subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"ray {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _get(url: str, token: str | None, path: str) -> tuple[int, Any]:
    """(HTTP status, JSON reply) of the head's `GET /api/<path>`; status 0 while nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/api/{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None


def _jobs_api(url: str, token: str | None, path: str = "") -> tuple[int, Any]:
    """The Jobs API: `GET /api/jobs/<path>`."""
    return _get(url, token, f"jobs/{path}")


def _node_processes(node: subprocess.Popen) -> list[psutil.Process]:
    """Every process of a node: its `ray start --block` (a session leader), what it started, and their children."""
    try:
        leader = psutil.Process(node.pid)
        processes = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(pid) == node.pid and pid not in {p.pid for p in processes}:
                processes.append(psutil.Process(pid))
    return processes


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL every process of the node at once, as when a cloud reclaims the machine."""
    for process in _node_processes(node):
        with contextlib.suppress(psutil.Error):
            process.kill()
    node.wait(timeout=30)


def _stop_node(node: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it stops what it started), then SIGKILL whatever is left of the node."""
    if node.poll() is None:
        node.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=30)
    _kill_node(node)


def _start_node(args: list[str], env: dict[str, str], log: Path, namespace: str | None = None) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own; with `namespace` (a bash prelude), first `unshare`d into a
    private mount namespace where the prelude runs as root before `ray start` replaces it."""
    command = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args]
    if namespace is not None:
        script = f"set -e\n{namespace}\nexec {' '.join(shlex.quote(part) for part in command)}"
        command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _private_tmp(keep: list[Path], holds: list[Path]) -> str:
    """The bash prelude of a worker node: tmpfs on /tmp and /dev/shm (its Ray session, object store, caches and
    HOME live there), after bind-mounting aside each `keep` path below them (the checkout and its venv) onto a
    `holds` folder and back. A path of the driver's temp dir is then missing on the node, as on a real cluster."""
    hidden = [(path, hold) for path, hold in zip(keep, holds, strict=True) if path.is_relative_to("/tmp")]
    lines = [f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(hold))}" for path, hold in hidden]
    lines += ["mount -t tmpfs -o size=4g tmpfs /tmp", "mount -t tmpfs -o size=2g tmpfs /dev/shm"]
    for path, hold in hidden:
        lines += [
            f"mkdir -p {shlex.quote(str(path))}",
            f"mount --bind {shlex.quote(str(hold))} {shlex.quote(str(path))}",
        ]
    return "\n".join([*lines, 'mkdir -p "$HOME"'])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """cluster.yaml's shape on loopback: a token-authenticated head with no CPUs (the Jobs API and the job's
    driver run there, no tasks) and two 2-CPU worker nodes, each in a private mount namespace."""
    if os.geteuid() != 0:
        pytest.fail("the 3-node cluster test needs root for `unshare --mount` (CI runs as root)")
    temp_dir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths live below it
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    # A fresh token, saved under this temp HOME rather than in the user's ~/.ray/auth_token.
    token = subprocess.run(
        [BIN / "ray", "get-auth-token", "--generate"],
        env={**clean, "HOME": str(temp_dir)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        **clean,
        "PATH": f"{BIN}{os.pathsep}{clean.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (no 30 s node drain)
        # Ray Train's preemption watcher on (conftest turns it off for the one-node tests), polling often; a node
        # that stops answering is declared dead in about 3 s rather than 30.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    gcs, dashboard, client, agent, env_agent = _free_ports(5)
    head = _start_node(
        [
            "--head",
            f"--port={gcs}",
            "--num-cpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--runtime-env-agent-port={env_agent}",
            f"--temp-dir={temp_dir / 'ray'}",
            "--object-store-memory=300000000",
        ],
        env,
        tmp_path / "head.log",
    )
    keep = sorted({ROOT, Path(sys.prefix).resolve()})
    holds = [Path(tempfile.mkdtemp(prefix="raybpo-node-", dir="/var/tmp")) for _ in keep]
    # Each worker node: its own HOME and model cache in its private /tmp, and its own ranges of worker ports.
    node_env = {**env, "HOME": "/tmp/home", "RAYBPO_MODEL_CACHE": "/tmp/raybpo-model-cache"}
    workers = []
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(lambda: _jobs_api(url, token)[0] == 200, head, tmp_path / "head.log", f"no Jobs API at {url}")
        for i in range(2):
            agent, env_agent = _free_ports(2)
            args = [
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                "--object-store-memory=300000000",
                f"--dashboard-agent-listen-port={agent}",
                f"--runtime-env-agent-port={env_agent}",
                f"--min-worker-port={20000 + 2000 * i}",
                f"--max-worker-port={21999 + 2000 * i}",
            ]
            workers.append(_start_node(args, node_env, tmp_path / f"worker-{i}.log", _private_tmp(keep, holds)))
        cluster = Cluster(url, f"127.0.0.1:{gcs}", token, env, temp_dir, workers)
        for i, worker in enumerate(workers):
            _wait_for(lambda: _alive_nodes(cluster) >= 3, worker, tmp_path / f"worker-{i}.log", "2 worker nodes")
        yield cluster
    finally:
        for node in [*workers, head]:
            _stop_node(node)
        for folder in [temp_dir, *holds]:
            shutil.rmtree(folder, ignore_errors=True)


def _listed(cluster: Cluster, kind: str, **equal: str) -> list[dict[str, Any]]:
    """The State API's rows of `kind` (what `ray list KIND --filter key=value` shows) whose fields equal `equal`."""
    query = urllib.parse.urlencode(
        [
            (k, v)
            for key, value in equal.items()
            for k, v in [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        ]
    )
    status, reply = _get(cluster.url, cluster.token, f"v0/{kind}?{query}")
    assert status == 200, f"State API: HTTP {status} for {kind}"
    return reply["data"]["result"]["result"]


def _alive_nodes(cluster: Cluster) -> int:
    return len(_listed(cluster, "nodes", state="ALIVE"))


def _wait_for(ready: Callable[[], bool], node: subprocess.Popen, log: Path, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert node.poll() is None, f"ray start exited ({node.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not there after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _train_files(run: RunDir, name: str) -> list[Any]:
    """The JSON files `name` of the train stage's Ray Train run in the run's storage so far (a checkpoint's loop
    state, `trainer_state.json`, or the controller's `checkpoint_manager_snapshot.json`)."""
    selector = pafs.FileSelector(run.path(CHECKPOINTS), recursive=True, allow_not_found=True)
    found = []
    for info in run.fs.get_file_info(selector):
        if f"/{CHECKPOINTS}/{TRAIN}-" in info.path and info.path.endswith(f"/{name}"):
            # Gone (2 are kept), or read while being rewritten (moto may serve a PUT in progress): the next poll.
            with contextlib.suppress(OSError, json.JSONDecodeError), run.fs.open_input_stream(info.path) as file:
                found.append(json.loads(file.read()))
    return found


def _jit_checkpoint_registered(run: RunDir) -> bool:
    """Whether the just-in-time checkpoint is stored AND Ray Train's controller took its report (its snapshot's
    latest checkpoint is that step or later): only then does a restart resume from it."""
    jit = [step for state in _train_files(run, STATE_FILE) for step in state.get("preemption_checkpoints", [])]
    snapshots = _train_files(run, "checkpoint_manager_snapshot.json")
    latest = [s["latest_checkpoint_result"]["metrics"]["step"] for s in snapshots if s.get("latest_checkpoint_result")]
    return bool(jit and latest and max(latest) >= min(jit))


def _tensorboard_losses(run: RunDir, folder: Path) -> list[dict[int, float]]:
    """The `loss` scalars (step -> value) of each TensorBoard event file of train in the run's storage, oldest file
    first (event files are named by their start time), each fetched into its own folder below `folder`."""
    selector = pafs.FileSelector(run.path(TRAIN, "tensorboard"), recursive=True, allow_not_found=True)
    paths = [info.path for info in run.fs.get_file_info(selector) if "tfevents" in info.path]
    losses = []
    for i, path in enumerate(sorted(paths, key=lambda p: int(p.rsplit("/", 1)[1].split(".")[3]))):
        local = folder / str(i) / path.rsplit("/", 1)[1]
        local.parent.mkdir(parents=True, exist_ok=True)
        with run.fs.open_input_stream(path) as file:
            local.write_bytes(file.read())
        scalars = EventAccumulator(str(local.parent)).Reload()
        losses.append({e.step: e.value for e in scalars.Scalars("loss")} if "loss" in scalars.Tags()["scalars"] else {})
    return losses


def _wait_while_running(cluster: Cluster, job_id: str, done: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `done` until it holds; fail when the job ends first or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        status = (_jobs_api(cluster.url, cluster.token, job_id)[1] or {}).get("status")
        assert status in ("PENDING", "RUNNING"), f"the job ended ({status}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.3)


def _preempt_the_train_node(cluster: Cluster, run: RunDir, job_id: str) -> subprocess.Popen:
    """Once train's worker is up (depth is done, so sft's are gone): drain its node for preemption, as Ray's
    autoscaler does when a spot instance gets its reclaim notice; once the just-in-time checkpoint is stored, kill
    the node. Returns the node killed."""

    def train_worker() -> list[dict[str, Any]]:
        return (
            _listed(cluster, "actors", class_name="RayTrainWorker", state="ALIVE")
            if run.exists(DEPTH, MANIFEST)
            else []
        )

    _wait_while_running(cluster, job_id, lambda: bool(train_worker()), "train worker", timeout=420)
    (worker,) = train_worker()
    (node,) = [n for n in cluster.workers if worker["pid"] in {p.pid for p in _node_processes(n)}]
    cluster.ray(
        "drain-node",
        "--address",
        cluster.gcs,
        "--node-id",
        worker["node_id"],
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        "spot reclaim (test)",
        "--deadline-remaining-seconds",
        "30",
    )
    _wait_while_running(cluster, job_id, lambda: _jit_checkpoint_registered(run), "just-in-time checkpoint", 30)
    _kill_node(node)
    return node


def _wait_for_job(cluster: Cluster, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _jobs_api(cluster.url, cluster.token, job_id)[1] or {}
        if job.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} not done after {timeout} s: {job}"
        time.sleep(1)


def _selected_pair_ids(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(pads.dataset(path, filesystem=fs).to_table(columns=["pair_id"])["pair_id"].to_pylist())


def _counts(manifest: dict[str, Any]) -> tuple[int, int, int]:
    return manifest["rows_in"], manifest["rows_out"], manifest["rows_quarantined"]


def test_the_pipeline_job_on_three_nodes_with_s3_storage_survives_a_preempted_worker_node(
    cluster: Cluster, s3: str, tiny_run, tmp_path: Path
):
    """`ray job submit` of the tiny pipeline (its actor pools autoscaling) to a CPU-free head and
    two worker nodes that see neither the driver's disk nor each other's, the run directory on the loopback S3
    server. During train the node of its worker is drained for preemption, then killed: the loop saves a
    just-in-time checkpoint, Ray Train restarts the worker on the other node, it resumes, and the job succeeds
    with the same selected pairs, counts, training metrics and win rates as the session's tiny run of the same
    config, locally in one process (fixed pools of one actor)."""
    assert _jobs_api(cluster.url, None)[0] in (401, 403)  # no token, no Jobs API
    job_id = f"raybpo-test-{uuid.uuid4().hex[:8]}"
    run = RunDir(f"{s3}/cluster-{job_id}")
    cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.url,
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        str(ROOT / "jobs" / "runtime_env.yaml"),
        "--",
        "python",
        "jobs/run_pipeline.py",
        *TINY_RUN,
        "--run-dir",
        run.uri,
        *AUTOSCALING_POOLS,
    )
    try:
        killed = _preempt_the_train_node(cluster, run, job_id)
        job = _wait_for_job(cluster, job_id, timeout=300)
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.ray("job", "stop", "--address", cluster.url, job_id)
        raise
    logs = cluster.ray("job", "logs", "--address", cluster.url, job_id)
    (tmp_path / "job.log").write_text(logs)
    assert job["status"] == "SUCCEEDED", f"{job}\n{logs[-6000:]}"
    assert killed.poll() is not None and _alive_nodes(cluster) == 2

    train = run.read_json(f"{TRAIN}/manifest.json")
    (jit,) = train["restarts"]["preemption_checkpoints"]
    (resumed,) = train["restarts"]["resumed_from"]
    assert resumed >= jit, train["restarts"]  # from the just-in-time checkpoint, or a later one taken before the kill
    for stage in TINY_STAGES:
        expected = json.loads((tiny_run.path / stage / "manifest.json").read_text())
        got = run.read_json(f"{stage}/manifest.json")
        assert _counts(got) == _counts(expected), stage
        assert got.get("final_metrics") == expected.get("final_metrics"), stage
    assert _selected_pair_ids(run.fs, run.path(DEPTH, "selections", "bpo")) == _selected_pair_ids(
        pafs.LocalFileSystem(), str(tiny_run.path / DEPTH / "selections" / "bpo")
    )
    local_eval = json.loads((tiny_run.path / EVALUATE / "manifest.json").read_text())
    assert run.read_json(f"{EVALUATE}/manifest.json")["policies"] == local_eval["policies"]
    assert run.exists("report", "report.md")
    # The stages that save models wrote them to S3, and handed their actors and Train workers URIs.
    assert train["reference"] == run.uri_of("sft", "model") and train["pairs"]["input"].endswith("selections/bpo")
    assert run.exists("sft", "model", "model.safetensors")
    assert run.exists(TRAIN, "policy", "adapter", "adapter_model.safetensors")
    assert run.exists(TRAIN, "policy", "merged", "model.safetensors")
    # rank 0's TensorBoard events, uploaded from each attempt's node (the first one's up to every checkpoint it
    # reported): per step the latest attempt's loss, for every step, the same losses as the metric history records
    first, resumed_events = _tensorboard_losses(run, tmp_path / "events")
    assert max(first) >= resumed and min(resumed_events) == resumed + 1
    logged = {**first, **resumed_events}
    assert sorted(logged) == list(range(1, train["steps"] + 1))
    history = [json.loads(line) for line in run.read_bytes(f"{TRAIN}/metrics.jsonl").decode().splitlines()]
    assert all(logged[row["step"]] == pytest.approx(row["loss"], rel=1e-6) for row in history)
    # The models were fetched into the surviving node's own cache (its /tmp, seen through one of its processes).
    (survivor,) = [n for n in cluster.workers if n is not killed]
    cache = Path(f"/proc/{survivor.pid}/root/tmp/raybpo-model-cache")
    assert any((folder / COMPLETE).exists() for folder in cache.iterdir())
