"""Run directories in object storage, on a real S3 API on loopback (moto's server mode, the `s3` fixture): a
model folder there is fetched into each node's cache by whoever loads it, once per content. The whole pipeline on
an `s3://` run directory (its models, TensorBoard events and results) is tests/test_cluster.py's 3-node job."""

from pathlib import Path

import pytest

from raybpo import rundir
from raybpo.rundir import COMPLETE, RunDir, node_local


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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_moves_within_the_run_dir(where, s3, tmp_path):
    run = RunDir(f"{s3}/move" if where == "s3" else str(tmp_path / "run"))
    _write(run.uri, {"checkpoints/train-1/a.json": b"1", "checkpoints/train-1/nested/b.bin": b"22"})
    run.move(("checkpoints", "train-1"), ("checkpoints", "replaced-x", "train-1"))
    assert run.folders("checkpoints") == ["replaced-x"] and not run.exists("checkpoints", "train-1")
    assert run.read_bytes("checkpoints/replaced-x/train-1/a.json") == b"1"
    assert run.read_bytes("checkpoints/replaced-x/train-1/nested/b.bin") == b"22"
    assert run.folders("no-such-folder") == []
