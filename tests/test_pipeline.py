"""`raybpo run`: the whole stage graph on a tiny benchmark (the session's tests/tiny.yaml run), a rerun that
skips every stage, and `--from train` killed mid-training whose rerun (a plain `run`) redoes only the tail, to
the same outputs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray

from raybpo import graph
from raybpo.cli import main
from raybpo.config import STAGE_ORDER, ConfigError, load_config, with_overrides
from raybpo.pipeline import StageRun, forget_from, run_pipeline, run_steps
from raybpo.rundir import RunDir, StageResult

TINY = str(Path(__file__).with_name("tiny.yaml"))
STAGES = [s for s in STAGE_ORDER if s != "reward"]  # tiny.yaml's stages


def planned_stages(cfg, from_stage=None, until_stage=None) -> list[str]:
    return [step.name for step in graph.plan(cfg, from_stage, until_stage)]


def _manifests(run: Path) -> dict[str, dict]:
    return {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}


def test_the_whole_pipeline_runs_and_ends_with_a_summary_and_the_report(tiny_run):
    run = tiny_run.path
    manifests = _manifests(run)
    assert manifests["depth"]["selection"] == "bpo" and manifests["depth"]["budget"] == manifests["train"]["rows_in"]
    assert manifests["evaluate"]["rows_in"] > 0 and 0.0 <= manifests["evaluate"]["win_rate"] <= 1.0
    for stage in ("sft", "train"):  # the exported checkpoint: the best one by eval loss, with its step and metrics
        history = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        best = min((row for row in history if "eval_loss" in row), key=lambda row: row["eval_loss"])
        exported = manifests[stage]["exported"]
        assert exported["step"] == best["step"] and exported["metrics"]["eval_loss"] == best["eval_loss"], stage
    evaluation = json.loads((run / "evaluate/evaluation.json").read_text())
    assert [p["name"] for p in evaluation["policies"]] == ["train"]
    markdown = (run / "report/report.md").read_text()
    assert (run / "report/report.html").exists() and "win rate" in markdown.lower()
    print(f"tiny pipeline: {tiny_run.seconds:.0f} s")


def test_a_rerun_skips_every_stage(tiny_run, tmp_path, capsys):
    run = tiny_run.copy(tmp_path / "run")
    before = _manifests(run)
    assert main(["run", "--config", TINY, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(STAGES)
    assert "report: " in out and "stage" in out and "wall s" in out  # the summary table and where the report is
    assert _manifests(run) == before


def test_from_train_killed_mid_training_reruns_only_the_tail_to_the_same_outputs(tiny_run, tmp_path):
    """Kill `raybpo run --from train` while it trains (its first checkpoint), then `raybpo run`: the stages before
    train are left as they were, train and evaluate are redone, and the outputs equal the uninterrupted run's.

    The killed driver joins this session's Ray, as a driver on a running cluster would: Ray ends its job's
    actors (its Train controller and workers) when the driver dies."""
    run = tiny_run.path
    copy = tiny_run.copy(tmp_path / "run", "checkpoints", "report")  # train starts from scratch: no checkpoints
    command = ["run", "--config", TINY, "--run-dir", str(copy), "--from", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "raybpo.cli", *command],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not any((copy / "checkpoints").glob("train-*/checkpoint_*")) and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver never reached its first train checkpoint"
        time.sleep(0.5)
    assert driver.poll() is None, "the pipeline finished before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (copy / "train/manifest.json").exists() and not (copy / "evaluate/manifest.json").exists()
    rerun = ["run", "--config", TINY, "--run-dir", str(copy)]  # no --from: the stages that died are redone
    assert main(rerun) == 0  # on the same Ray; train resumes from its checkpoint when Ray Train had taken one
    before, after = _manifests(run), _manifests(copy)
    for stage in STAGES[: STAGES.index("train")]:
        assert after[stage] == before[stage], stage
    for stage in ("train", "evaluate"):
        assert after[stage]["created_at"] >= before[stage]["created_at"] and after[stage] != before[stage], stage
        assert after[stage]["config_hash"] == before[stage]["config_hash"]
    assert after["evaluate"]["win_rate"] == before["evaluate"]["win_rate"]  # CPU training is deterministic
    assert after["train"]["final_metrics"] == before["train"]["final_metrics"]
    a = pads.dataset(run / "depth/selections/bpo").to_table().sort_by("pair_id")
    b = pads.dataset(copy / "depth/selections/bpo").to_table().sort_by("pair_id")
    assert a.equals(b)


def test_stage_names_and_from_are_checked(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path}"])
    assert planned_stages(cfg) == STAGES
    assert planned_stages(cfg, until_stage="breadth") == ["ingest", "sft", "breadth"]
    assert planned_stages(load_config(None, [f"run_dir={tmp_path}"])) == list(STAGE_ORDER)
    with pytest.raises(ConfigError, match="not a stage"):
        planned_stages(cfg, until_stage="polish")
    short = load_config(TINY, [f"run_dir={tmp_path}", "stages=[ingest,sft,train,evaluate]"])
    assert planned_stages(short) == ["ingest", "sft", "train", "evaluate"]
    with pytest.raises(ConfigError, match="do not include it"):
        planned_stages(short, from_stage="depth")
    with pytest.raises(ConfigError, match="stages"):
        load_config(TINY, ["stages=[ingest,polish]"])


def test_forget_from_removes_the_later_manifests_and_moves_their_checkpoints_aside(tmp_path):
    """`--from train`: train, its variants and evaluate lose their manifests, and the training runs of train and
    its variants move to checkpoints/replaced-<time>/, so they train again instead of resuming; sft's stay."""
    run = RunDir(tmp_path)
    for stage in ("ingest", "depth", "train", "train-dpo", "evaluate"):
        run.write_json(f"{stage}/manifest.json", {})
    for name in ("sft-0a1b", "train-2c3d", "train-dpo-4e5f"):
        run.write_json(f"checkpoints/{name}/checkpoint_1/trainer_state.json", {"step": 1})
    cfg = load_config(None, [f"run_dir={tmp_path}", "evaluate.variants={dpo: {overrides: {train.alpha: 0}}}"])
    assert sorted(forget_from(cfg, "train")) == ["evaluate", "train", "train-dpo"]
    assert run.exists("depth", "manifest.json") and not run.exists("train-dpo", "manifest.json")
    (aside,) = [name for name in run.folders("checkpoints") if name.startswith("replaced-")]
    assert run.folders("checkpoints") == [aside, "sft-0a1b"]
    assert run.folders("checkpoints", aside) == ["train-2c3d", "train-dpo-4e5f"]
    assert run.read_json(f"checkpoints/{aside}/train-2c3d/checkpoint_1/trainer_state.json") == {"step": 1}


def test_the_graph_is_the_one_stage_list(tmp_path):
    """config.STAGE_ORDER, the report's table and the CLI's commands are the graph's stages, in its order; every
    stage reads only earlier stages (that no stage imports raybpo.tune is tests/test_structure.py's)."""
    from raybpo.cli import build_parser
    from raybpo.report import STAGES as REPORT_STAGES

    assert graph.ORDER == STAGE_ORDER and REPORT_STAGES[:-1] == graph.ORDER
    for index, stage in enumerate(graph.STAGES):
        assert set(stage.reads) <= set(graph.ORDER[:index]), stage.name
    commands = build_parser()._subparsers._group_actions[0].choices
    assert [c for c in commands if c in graph.ORDER] == list(graph.ORDER)


def test_variants_are_planned_as_stages_after_train(tmp_path):
    variants = "evaluate.variants={random: {selection: random}, dpo: {overrides: {train.alpha: 0, train.rho: 1}}}"
    cfg = load_config(TINY, [f"run_dir={tmp_path}", variants])
    assert planned_stages(cfg) == [*STAGES[:-1], "train-random", "train-dpo", "evaluate"]
    assert planned_stages(cfg, until_stage="train") == STAGES[: STAGES.index("train") + 1]
    assert planned_stages(cfg, until_stage="train-random")[-2:] == ["train", "train-random"]
    dpo = graph.step(cfg, "train-dpo")
    assert dpo.stage.name == "train" and (dpo.cfg.train.alpha, dpo.cfg.train.rho) == (0.0, 1.0) and dpo.is_variant
    assert graph.step(cfg, "train-random").selection == "random" and graph.step(cfg, "train").cfg is cfg
    assert dpo.reads_key("train.beta0") and dpo.reads_key("evaluate.variants.dpo.overrides.train.beta0")
    assert not dpo.reads_key("evaluate.variants.random.selection") and not dpo.reads_key("evaluate.temperature")
    no_evaluate = load_config(TINY, [f"run_dir={tmp_path}", variants, "stages=[ingest,sft,train]"])
    assert planned_stages(no_evaluate) == ["ingest", "sft", "train"]  # variants exist to be evaluated
    with pytest.raises(ConfigError, match="not a stage"):
        planned_stages(cfg, until_stage="train-ipo")


def _fake_runs(block: dict[str, Callable[[], None]]) -> tuple[Callable, list[tuple[str, str]]]:
    """A `run_steps` start function that records (step, thread) and first calls `block[step]`, if any."""
    started: list[tuple[str, str]] = []

    def start(step):
        started.append((step.name, threading.current_thread().name))
        block.get(step.name, lambda: None)()
        return StageRun(step.name, step.stage.name, {}, False, 0.0)

    return start, started


def test_stages_that_read_nothing_of_each_other_run_at_once(tmp_path):
    """After ingest, sft, reward and breadth start together (each waits at a barrier until all three have started,
    so run one at a time they would fail); train and its variant together; evaluate after both, in this thread.
    reward waits for sft when the SFT policy is its backbone; with ray.parallel_stages=1 all run in plan order."""
    variants = "evaluate.variants={dpo: {overrides: {train.alpha: 0}}}"
    cfg = load_config(None, [f"run_dir={tmp_path}", variants])
    steps = graph.plan(cfg)
    waits = graph.waits_for(steps)
    assert waits["reward"] == ("ingest",) and waits["generate"] == ("sft", "breadth")
    assert waits["train-dpo"] == waits["train"] and set(waits["evaluate"]) >= {"train", "train-dpo", "reward"}
    assert graph.waits_for(graph.plan(with_overrides(cfg, {"reward.model": "sft"}, "test")))["reward"] == (
        "ingest",
        "sft",
    )
    after_ingest, trains = threading.Barrier(3, timeout=30), threading.Barrier(2, timeout=30)
    start, started = _fake_runs(
        {"sft": after_ingest.wait, "reward": after_ingest.wait, "breadth": after_ingest.wait}
        | {"train": trains.wait, "train-dpo": trains.wait}
    )
    ended: list[str] = []
    runs = run_steps(steps, 4, start, lambda run: ended.append(run.name))
    assert [run.name for run in runs] == [step.name for step in steps]  # in plan order, however they ended
    threads = dict(started)
    assert {threads[name] for name in ("sft", "reward", "breadth", "train", "train-dpo")} != {"MainThread"}
    assert threads["ingest"] == threads["evaluate"] == "MainThread" and sorted(ended) == sorted(threads)
    assert ended.index("evaluate") > max(ended.index("train"), ended.index("train-dpo"))

    start, started = _fake_runs({})
    run_steps(steps, 1, start, lambda run: None)
    assert started == [(step.name, "MainThread") for step in steps]


def test_a_failed_stage_lets_the_running_ones_finish_and_starts_no_other(tmp_path):
    """reward fails while sft and breadth run: they finish (and keep their manifests, so a rerun skips them), and
    generate, which reads only those two, is not started; the error is reward's."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "stages=[ingest,sft,reward,breadth,generate]"])
    breadth_started, reward_failed = threading.Event(), threading.Event()

    def reward() -> None:
        assert breadth_started.wait(30)
        reward_failed.set()
        raise ValueError("reward broke")

    def after_the_failure() -> None:
        assert reward_failed.wait(30)
        time.sleep(0.2)  # the failure reaches the scheduler first

    start, started = _fake_runs(
        {"reward": reward, "sft": after_the_failure, "breadth": lambda: (breadth_started.set(), after_the_failure())}
    )
    ended: list[str] = []
    with pytest.raises(ValueError, match="reward broke"):
        run_steps(graph.plan(cfg), 4, start, lambda run: ended.append(run.name))
    assert sorted(name for name, _ in started) == ["breadth", "ingest", "reward", "sft"]
    assert sorted(ended) == ["breadth", "ingest", "sft"]


def test_run_pipeline_hands_each_stage_the_callbacks_named_for_it(tmp_path, monkeypatch):
    """Tune's hook goes to the stage it names (train), not to sft or the variants: passed, not looked up."""
    seen = {}

    def fake(name):
        def run(cfg, ctx, **variant):
            seen[variant.get("stage", name)] = ctx.callbacks
            return StageResult({"stage": name}, skipped=False)

        return run

    monkeypatch.setattr(graph, "STAGES", tuple(dataclasses.replace(s, run=fake(s.name)) for s in graph.STAGES))
    variants = "evaluate.variants={dpo: {overrides: {train.alpha: 0}}}"
    cfg = load_config(None, [f"run_dir={tmp_path}", "stages=[ingest,sft,train,evaluate]", variants])
    hook = object()
    result = run_pipeline(cfg, callbacks={"train": [hook]})
    assert seen == {"ingest": (), "sft": (), "train": (hook,), "train-dpo": (), "evaluate": ()}
    assert [(r.name, r.stage) for r in result.stages][-2:] == [("train-dpo", "train"), ("evaluate", "evaluate")]
