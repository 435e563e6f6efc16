"""raybpo.artifacts: the run directory's locations and the resolvers of what a stage takes from another, and the
run directory's integrity (whole writes, garbled manifests, folders raybpo did not make), on a hand-made run
directory (no Ray, no models)."""

import logging
import os
from pathlib import Path

import pytest

from raybpo import artifacts
from raybpo.config import Config, load_config
from raybpo.rundir import (
    STAGE_MARKER,
    ForeignFolderError,
    RunDir,
    StageCounts,
    StageMissingError,
    require_stage,
    run_stage,
    stage_identity,
)


def _stage(run_dir: RunDir, cfg: Config, name: str, folders: tuple[tuple[str, ...], ...] = (), **extra) -> dict:
    """A finished stage `name` with the given output folders (each holding one file) and manifest extras."""

    def body(stage_path: str) -> StageCounts:
        for parts in folders:
            run_dir.write_bytes(artifacts.relpath((*parts, "part-0")), b"x")
        return StageCounts(rows_in=1, rows_out=1, extra=extra)

    return run_stage(run_dir, name, cfg, ("train",), {}, body).manifest


@pytest.fixture
def run(tmp_path) -> tuple[RunDir, Config]:
    cfg = Config(run_dir=str(tmp_path / "run"))
    return RunDir(cfg.run_dir), cfg


def test_locations_are_relative_parts_below_the_run_dir(run):
    run_dir, _ = run
    assert artifacts.INGESTED_PAIRS == ("ingest", "pairs")
    assert artifacts.relpath(artifacts.BENCHMARK_EVAL_PROMPTS) == "ingest/benchmark/eval_prompts.jsonl"
    assert artifacts.merged_policy("train-dpo") == ("train-dpo", "policy", "merged")
    assert artifacts.in_stage(artifacts.merged_policy("train"), folder=True) == "policy/merged/"
    assert artifacts.in_stage(artifacts.training_metrics("sft")) == "metrics.jsonl"
    assert run_dir.path(*artifacts.depth_selection("bpo")) == f"{run_dir.root}/depth/selections/bpo"
    for parts in (artifacts.INGESTED_PAIRS, artifacts.depth_selection("random")):
        assert artifacts.trained_pairs({"pairs": {"input": run_dir.path(*parts)}}) == parts


def test_reference_model_is_the_sft_model_or_the_external_policy(run):
    run_dir, cfg = run
    with pytest.raises(StageMissingError, match="run `raybpo sft` first"):
        artifacts.reference_model(cfg, run_dir)  # the tiny policy exists only after sft
    external = load_config(None, ["policy.model=some/hub-id"])
    source = artifacts.reference_model(external, run_dir)
    assert (source.artifact, source.uri) == (None, "some/hub-id")
    assert source.identity == f"{external.section_hash('policy')}@external"
    manifest = _stage(run_dir, cfg, "sft", (artifacts.SFT_MODEL,))
    with_sft = load_config(None, ["reward.model=sft"])
    for source in (artifacts.reference_model(cfg, run_dir), artifacts.reward_backbone(with_sft, run_dir)):
        assert source.artifact == artifacts.Artifact(run_dir.uri, artifacts.SFT_MODEL)
        assert source.uri == run_dir.path("sft", "model")
        assert source.identity == stage_identity(manifest) and source.manifest == manifest
    assert artifacts.reward_backbone(cfg, run_dir).uri == cfg.reward.model  # the bundled MiniLM, by name


def test_scorer_and_judge_models_in_their_order(run):
    run_dir, cfg = run
    with pytest.raises(StageMissingError):
        artifacts.scorer_model(cfg, run_dir)
    _stage(run_dir, cfg, "reward", (artifacts.REWARD_MODELS,))
    with pytest.raises(ValueError, match="single/average mode"):
        artifacts.scorer_model(cfg, run_dir)
    run_dir.remove("reward")
    manifest = _stage(run_dir, cfg, "reward", (artifacts.REWARD_MODEL,))
    scorer = artifacts.scorer_model(cfg, run_dir)
    assert scorer.uri == run_dir.path("reward", "model") and scorer.identity == stage_identity(manifest)
    assert artifacts.judge_model(cfg, run_dir) == scorer  # no judge half: the scorer judges
    run_dir.remove("reward")
    manifest = _stage(run_dir, cfg, "reward", (artifacts.REWARD_MODEL, artifacts.REWARD_JUDGE))
    judge = artifacts.judge_model(cfg, run_dir)
    assert judge.uri == run_dir.path("reward", "judge") and judge.identity == f"{stage_identity(manifest)}#judge"
    named = load_config(None, ["evaluate.reward_model=/models/rm"])
    assert artifacts.judge_model(named, run_dir).identity == "external:/models/rm"
    assert artifacts.scorer_model(load_config(None, ["score.reward_model=/models/rm"]), run_dir).uri == "/models/rm"


def test_input_pairs_and_trained_policy(run):
    run_dir, cfg = run
    ingest = _stage(run_dir, cfg, "ingest", (artifacts.INGESTED_PAIRS,))
    pairs, manifest = artifacts.input_pairs(run_dir)
    assert (pairs.parts, manifest) == (artifacts.INGESTED_PAIRS, ingest)
    depth = _stage(run_dir, cfg, "depth", (artifacts.depth_selection("bpo"),), selection="bpo")
    assert artifacts.input_pairs(run_dir)[0].parts == artifacts.depth_selection("bpo")
    assert artifacts.input_pairs(run_dir)[1] == depth
    with pytest.raises(StageMissingError, match="no selection 'random'"):
        artifacts.input_pairs(run_dir, "random")
    with pytest.raises(StageMissingError, match="no finished run"):
        artifacts.trained_policy(run_dir, "train")
    _stage(run_dir, cfg, "train", (artifacts.policy_adapter("train"),))
    with pytest.raises(StageMissingError, match="no merged policy"):
        artifacts.trained_policy(run_dir, "train")
    run_dir.remove("train")
    train = _stage(run_dir, cfg, "train", (artifacts.merged_policy("train"),))
    policy = artifacts.trained_policy(run_dir, "train")
    assert policy.uri == run_dir.path("train", "policy", "merged") and policy.manifest == train


def test_a_garbled_manifest_is_an_unfinished_stage_named_in_a_warning(run, caplog):
    run_dir, cfg = run
    first = _stage(run_dir, cfg, "train", (("train", "policy"),))
    Path(run_dir.path("train", "manifest.json")).write_text('{"stage": "tra')  # cut short by an older raybpo
    with pytest.raises(StageMissingError, match=r"train has no finished run \(no readable manifest.json\)"):
        require_stage(run_dir, "train")
    with caplog.at_level(logging.WARNING, logger="raybpo.rundir"):
        again = _stage(run_dir, cfg, "train", (("train", "policy"),))
    assert again["created_at"] >= first["created_at"] and run_dir.read_json("train/manifest.json") == again
    assert f"manifest {run_dir.path('train', 'manifest.json')} is unreadable" in caplog.text


def test_a_failed_write_leaves_the_old_file_whole(run):
    run_dir, _ = run
    run_dir.write_json("train/manifest.json", {"stage": "train"})
    with pytest.raises(TypeError):
        run_dir.write_bytes("train/manifest.json", object())  # fails part-way, as a full disk or a kill would
    assert run_dir.read_json("train/manifest.json") == {"stage": "train"}
    assert sorted(os.listdir(run_dir.path("train"))) == ["manifest.json"]  # no temporary file left


def test_a_folder_raybpo_did_not_make_is_never_deleted(run):
    """`--run-dir` pointed at a folder with a user's own `train/`: the stage refuses to delete it."""
    run_dir, cfg = run
    run_dir.write_bytes("train/notes.txt", b"mine")
    with pytest.raises(ForeignFolderError, match=r"train exists but was not made by raybpo .* another --run-dir"):
        _stage(run_dir, cfg, "train")
    assert run_dir.read_bytes("train/notes.txt") == b"mine"
    run_dir.remove("train")
    _stage(run_dir, cfg, "train")
    run_dir.remove("train", "manifest.json")  # a stage of raybpo's that died half-way is redone
    _stage(run_dir, cfg, "train")
    assert run_dir.exists("train", STAGE_MARKER) and run_dir.exists("train", "manifest.json")
