"""Run directories in object storage, on a real S3 API on loopback (moto's server mode, the `s3` fixture): a
model folder there is fetched into each node's cache by whoever loads it, once per content; and the stages that
load and save models (sft, train) run on an `s3://` run directory to the same results as on a local one, with
their TensorBoard event files there too."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raybpo import rundir
from raybpo.cli import main
from raybpo.rundir import COMPLETE, RunDir, node_local

TINY = str(Path(__file__).with_name("tiny.yaml"))


def _write(uri: str, files: dict[str, bytes]) -> None:
    run_dir = RunDir(uri)
    for name, data in files.items():
        run_dir.write_bytes(name, data)


def test_a_remote_folder_is_fetched_once_per_content_and_a_local_path_is_used_as_is(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBPO_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"{s3}/fetch/model"
    _write(uri, {"config.json": b"{}", "nested/weights.bin": b"1234"})
    local = Path(node_local(uri))
    assert local.parent == tmp_path / "cache" and (local / COMPLETE).exists()
    assert (local / "config.json").read_bytes() == b"{}" and (local / "nested" / "weights.bin").read_bytes() == b"1234"

    monkeypatch.setattr(rundir.pafs, "copy_files", lambda *a, **k: pytest.fail("fetched the same content twice"))
    assert node_local(uri) == str(local)
    monkeypatch.undo()
    monkeypatch.setenv("RAYBPO_MODEL_CACHE", str(tmp_path / "cache"))

    _write(uri, {"nested/weights.bin": b"56789"})  # a redone stage rewrote the folder: fetched again
    again = Path(node_local(uri))
    assert again != local and (again / "nested" / "weights.bin").read_bytes() == b"56789"
    assert node_local(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        node_local(f"{s3}/fetch/no-such-model")


def test_sft_and_train_on_an_s3_run_dir_match_the_local_run(s3, tiny_run, tmp_path):
    """The session's tiny run's ingest uploaded, then sft and train (on the ingested pairs) on `s3://`: sft ends
    with exactly the local run's metrics (same config, seed and rows), both write their models there, and what
    the stages hand their actors and Train workers are URIs (the manifests record them)."""
    uri = f"{s3}/tiny-run"
    RunDir(uri).upload_dir(tiny_run.path / "ingest", "ingest")
    assert main(["run", "--config", TINY, "--run-dir", uri, "stages=[ingest,sft,train]"]) == 0
    run_dir = RunDir(uri)
    sft, train = (run_dir.read_json(f"{stage}/manifest.json") for stage in ("sft", "train"))
    local_sft = json.loads((tiny_run.path / "sft" / "manifest.json").read_text())
    assert sft["final_metrics"] == local_sft["final_metrics"] and sft["steps"] == local_sft["steps"]
    assert train["reference"] == f"{uri}/sft/model" and train["pairs"]["input"].endswith("ingest/pairs")
    assert run_dir.exists("sft", "model", "model.safetensors")
    assert run_dir.exists("train", "policy", "adapter", "adapter_model.safetensors")
    assert run_dir.exists("train", "policy", "merged", "model.safetensors") and train["steps"] > 0

    # rank 0's TensorBoard events, uploaded from its node: the same losses the metric history records
    events = [
        info.path
        for info in run_dir.fs.get_file_info(pafs.FileSelector(run_dir.path("train", "tensorboard"), recursive=True))
        if "tfevents" in info.path
    ]
    assert len(events) == 1
    local_events = tmp_path / "events" / events[0].rsplit("/", 1)[1]
    local_events.parent.mkdir()
    local_events.write_bytes(run_dir.read_bytes(events[0].removeprefix(run_dir.root + "/")))
    scalars = EventAccumulator(str(local_events.parent)).Reload().Scalars("loss")
    history = [json.loads(line) for line in run_dir.read_bytes("train/metrics.jsonl").decode().splitlines()]
    logged = {event.step: event.value for event in scalars}  # every step; the history has the logged ones
    assert sorted(logged) == list(range(1, train["steps"] + 1))
    assert all(logged[row["step"]] == pytest.approx(row["loss"], rel=1e-6) for row in history)
