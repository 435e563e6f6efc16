"""Shared fixtures: one local Ray for the whole session, the real HH rows in ../shared/data/."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYBPO_SHARED_DATA", ROOT.parent / "shared" / "data"))
HH_TEST = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
