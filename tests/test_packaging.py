"""Packaging: the GPU extra resolves against raybpo's pins (a resolution only, `pip install --dry-run`, reading
wheel metadata from the package index), brings the vLLM release Ray 2.60's `ray[llm]` pins, and one faiss."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_extra_resolves_with_one_faiss_and_rays_vllm(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), f"{ROOT}[gpu]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {
        row["metadata"]["name"].lower(): row["metadata"]["version"] for row in json.loads(report.read_text())["install"]
    }
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    everything = {row["name"].lower(): row["version"] for row in json.loads(installed)} | resolved
    assert everything["vllm"] == "0.29.0" and everything["torch"].startswith("2.13.0")
    assert sorted(name for name in everything if name.startswith("faiss")) == ["faiss-cpu"]
