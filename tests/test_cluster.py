"""Cluster use: cluster.yaml against the Ray autoscaler's schema, jobs/configs against raybpo's config,
the jobs/ entrypoints, and a real `ray job submit` of the pipeline to a token-authenticated local head.

The head is started with `ray start --block` in its own session, temp dir and ports, and stopped by
signalling that session only: `ray stop` would kill every Ray on the machine, the test session's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from raybpo.config import load_config

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
TINY_RUN = ["--config", "tests/tiny.yaml"]
TINY_STAGES = load_config(ROOT / "tests" / "tiny.yaml").stages


# ----------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _workers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def _is_gpu(node_type: dict[str, Any]) -> bool:
    """AWS GPU instance families start with g or p (g5, g6e, p4d, p5, ...)."""
    return node_type["node_config"]["InstanceType"][0] in "gp"


def _is_spot(node_type: dict[str, Any]) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_cluster_yaml_passes_the_autoscaler_schema(cluster):
    """Against the schema Ray publishes with the launcher (`ray/autoscaler/ray-schema.json`), as `ray up` checks."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    broken = {**cluster, "available_node_types": {"head": {"resources": {}}}}  # no node_config
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_has_a_cpu_free_head_and_scale_to_zero_gpu_workers_on_demand_and_spot(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and not _is_spot(head)
    gpus = {name: t for name, t in _workers(cluster).items() if _is_gpu(t)}
    assert gpus and all(t["min_workers"] == 0 for t in gpus.values())
    assert any(_is_spot(t) for t in gpus.values())
    on_demand = [t for t in gpus.values() if not _is_spot(t)]
    assert on_demand and all(t["resources"].get("on_demand", 0) >= 1 for t in on_demand)
    assert not any(t["resources"].get("on_demand") for t in _workers(cluster).values() if _is_spot(t))


def test_cluster_installs_torch_then_raybpo_gpu_and_starts_ray_with_token_auth(cluster):
    setup = cluster["setup_commands"]
    torch_at = next(i for i, cmd in enumerate(setup) if "pip install" in cmd and "torch==2.13.0" in cmd)
    raybpo_at = next(i for i, cmd in enumerate(setup) if re.search(r"pip install .*raybpo\[gpu", cmd))
    assert torch_at < raybpo_at
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster[key] if "ray start" in cmd)
        assert "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in cluster["file_mounts"]


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


# ----------------------------------------------------------------------------- a real `ray job submit`


@dataclass
class Head:
    """A running head: its Jobs API URL and token, the environment its processes got, and its temp dir."""

    url: str
    token: str
    env: dict[str, str]
    temp_dir: Path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _jobs_api(url: str, token: str | None, path: str = "") -> tuple[int, Any]:
    """(HTTP status, JSON reply) of the Jobs API's `GET /api/jobs/<path>`; status 0 while nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/api/jobs/{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None


def _stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it stops what it started), then SIGKILL whatever is left of its session."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == process.pid:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    process.wait(timeout=10)


@pytest.fixture
def token_head(tmp_path: Path) -> Iterator[Head]:
    """A Ray head on loopback with token authentication, a dashboard (the Jobs API) and 2 CPUs."""
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
    }
    gcs, dashboard, client, agent, env_agent = _free_ports(5)
    log_path = tmp_path / "ray-start.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                BIN / "ray",
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--runtime-env-agent-port={env_agent}",
                f"--temp-dir={temp_dir / 'ray'}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while _jobs_api(url, token)[0] != 200:
            assert process.poll() is None, f"ray start exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no Jobs API at {url} after 90 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Head(url, token, env, temp_dir)
    finally:
        _stop_session(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_on_a_token_authenticated_head(token_head: Head, tiny_run, tmp_path: Path):
    """The job runs `raybpo run` on a copy of the session's tiny run without its evaluate stage and report: the
    pipeline skips the finished stages and runs evaluate (Ray Data on the head) and the report."""
    assert _jobs_api(token_head.url, None)[0] in (401, 403)  # no token, no Jobs API
    ray, address = str(BIN / "ray"), ["--address", token_head.url]
    submission_id = f"raybpo-test-{uuid.uuid4().hex[:8]}"
    run_dir = tiny_run.copy(tmp_path / "run", "evaluate", "report")
    submit = [
        ray,
        "job",
        "submit",
        *address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        str(ROOT / "jobs" / "runtime_env.yaml"),
        "--",
        "python",
        "jobs/run_pipeline.py",
        *TINY_RUN,
        "--run-dir",
        str(run_dir),
    ]
    try:
        result = subprocess.run(submit, env=token_head.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        subprocess.run([ray, "job", "stop", *address, submission_id], env=token_head.env, timeout=60)
        raise
    _, job = _jobs_api(token_head.url, token_head.token, submission_id)
    assert result.returncode == 0 and (job or {}).get("status") == "SUCCEEDED", f"{job}\n{result.stdout[-6000:]}"
    assert result.stdout.count("up to date, skipped") == len(TINY_STAGES) - 1, result.stdout[-6000:]
    assert "evaluate: done" in result.stdout, result.stdout[-6000:]

    manifest = json.loads((run_dir / "ingest" / "manifest.json").read_text())
    assert manifest["rows_out"] == 3 * 40 and manifest["rows_quarantined"] == 0
    evaluation = json.loads((run_dir / "evaluate" / "manifest.json").read_text())
    assert 0.0 <= evaluation["win_rate"] <= 1.0 and (run_dir / "report" / "report.md").is_file()
    # The job ran the uploaded checkout: jobs/ is there, the venv and local runs are not.
    packages = token_head.temp_dir / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    (uploaded,) = [p for p in packages.glob("_ray_pkg_*") if p.is_dir()]
    assert (uploaded / "jobs" / "run_pipeline.py").is_file()
    assert not (uploaded / ".venv").exists() and not (uploaded / "runs").exists()
