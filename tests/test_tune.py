"""`raybpo tune`: the search space, how a trial gets the main run's finished stages, and a two-trial sweep over
train.beta0 on a tiny run in object storage.

The run: tests/tiny.yaml's benchmark (3 x 40 pairs over 24 prompts, 4 held-out prompts) and its SFT model as
`policy.model` (both from the session's tiny run, uploaded; no sft stage), stages ingest, train, evaluate, the run
directory on the loopback S3 server. The sweep shares the main run's ingest (copied into each trial by the store
itself) and runs train + evaluate per trial, two trials at once, with ASHA on eval_loss.
"""

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import ray
from ray.util import placement_group_table

from raybpo.config import Config, ConfigError, TuneConfig, load_config
from raybpo.rundir import RunDir
from raybpo.tune import run_tune
from raybpo.tune.search import check_search, trial_name, trial_overrides
from raybpo.tune.trial import StopBoard, copy_stage, make_scheduler

TINY = Path(__file__).with_name("tiny.yaml")
TRAIN = {"batch_size": 16, "micro_batch_size": 16, "epochs": 1, "checkpoint_every": 5, "log_every": 1000, "lr": 1e-2}
TRAIN |= {"precompute_ref_logps": False}  # the tiny reference runs inside the step: no model in the prepare pass


def _config(run_dir: Path, **tune) -> Config:
    cfg = Config(run_dir=str(run_dir), stages=["ingest", "train", "evaluate"])
    cfg.ingest.preset = "benchmark"
    cfg.benchmark = cfg.benchmark.model_copy(update={"pairs_per_source": 60, "train_prompts": 30, "eval_prompts": 6})
    cfg.train = cfg.train.model_copy(update=TRAIN)
    cfg.evaluate = cfg.evaluate.model_copy(update={"samples_per_prompt": 1, "max_new_tokens": 8, "batch_size": 8})
    cfg.tune = cfg.tune.model_validate({**cfg.tune.model_dump(), **tune})
    return cfg


# -- the search space -----------------------------------------------------------------------------------------


def test_a_wrong_key_or_value_in_the_search_space_is_named_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.betta0' \(did you mean 'beta0'\?\)"):
        run_tune(_config(tmp_path / "run", search_space={"train.betta0": [0.1, 0.2]}))
    with pytest.raises(ConfigError, match=r"train.rho: Input should be less than or equal to 1"):
        check_search(_config(tmp_path / "run", search_space={"train.rho": [0.5, 2]}))
    with pytest.raises(ConfigError, match="fixed for a sweep"):
        check_search(_config(tmp_path / "run", search_space={"run_dir": ["a", "b"]}))
    with pytest.raises(ConfigError, match=r"none of the config.s stages .* reads depth"):
        check_search(_config(tmp_path / "run", search_space={"depth.eta": [0.1, 0.2]}))
    with pytest.raises(ConfigError, match="listed twice"):
        check_search(_config(tmp_path / "run", search_space={"train.beta0": [0.1, 0.1]}))
    with pytest.raises(ConfigError, match=r"tune\.search_space is empty"):
        check_search(_config(tmp_path / "run"))
    with pytest.raises(ConfigError, match="num_samples counts random draws"):
        load_config(None, ["tune.num_samples=3"])
    assert not (tmp_path / "run").exists()


def test_the_first_stage_is_the_first_planned_stage_reading_a_searched_section(tmp_path):
    cfg = _config(tmp_path, search_space={"train.beta0": [0.1], "evaluate.temperature": [0.5]})
    assert check_search(cfg) == "train"
    cfg.stages = ["ingest", "sft", "breadth", "generate", "score", "depth", "train", "evaluate"]
    assert check_search(cfg) == "depth"  # depth hashes the whole train section
    cfg.tune.search_space = {"seed": [0, 1]}
    assert check_search(cfg) == "ingest"


def test_grid_and_seeded_random_trials():
    cfg = load_config(None, ["tune.search_space.train.beta0=[0.05,0.1]", "tune.search_space.train.rho=[0.5,0.8,1]"])
    grid = trial_overrides(cfg)
    assert len(grid) == 6 and grid[0] == {"train.beta0": 0.05, "train.rho": 0.5} and grid[5]["train.rho"] == 1
    assert len({trial_name(t) for t in grid}) == 6
    cfg.tune.search, cfg.tune.num_samples = "random", 4
    draws = trial_overrides(cfg)
    assert len(draws) == 4 and all(d in grid for d in draws) and len({trial_name(d) for d in draws}) == 4
    assert draws == trial_overrides(cfg)  # seeded
    cfg.tune.num_samples = 7
    with pytest.raises(ConfigError, match="exceeds the 6 combinations"):
        trial_overrides(cfg)


def test_asha_stops_a_trial_through_the_board_and_tells_tune_to_continue(ray_session):
    board = StopBoard.remote()
    asha = make_scheduler(TuneConfig(grace_period=5, reduction_factor=2), board)
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, {"step": 3, "eval_loss": 0.5}) == asha.CONTINUE  # before grace_period
    assert asha.on_trial_result(None, good, {"step": 5, "eval_loss": 0.6}) == asha.CONTINUE
    assert asha.on_trial_result(None, bad, {"step": 5, "eval_loss": 0.9}) == asha.CONTINUE  # ASHA said stop
    assert asha.on_trial_result(None, bad, {"step": 6}) == asha.CONTINUE  # no metric: ignored
    assert ray.get([board.stopped.remote("good"), board.stopped.remote("bad")]) == [False, True]
    ray.kill(board)


# -- a trial's copy of the main run's stages --------------------------------------------------------------------


def _stage(run: RunDir) -> None:
    run.write_bytes("ingest/pairs/part-0.parquet", b"rows")
    run.write_json("ingest/manifest.json", {"stage": "ingest"})


def test_a_trial_shares_a_local_stage_as_hard_links_and_an_s3_stage_is_copied_by_the_store(s3, tmp_path, monkeypatch):
    local, trial = RunDir(tmp_path / "main"), RunDir(tmp_path / "trial")
    _stage(local)
    copy_stage(local, trial, "ingest")
    for name in ("pairs/part-0.parquet", "manifest.json"):
        assert os.stat(trial.path("ingest", name)).st_ino == os.stat(local.path("ingest", name)).st_ino

    remote, remote_trial = RunDir(f"{s3}/copy/main"), RunDir(f"{s3}/copy/tune/trial")
    _stage(remote)
    monkeypatch.setattr(pafs, "copy_files", lambda *a, **k: pytest.fail("streamed through this process"))
    copy_stage(remote, remote_trial, "ingest")
    assert remote_trial.read_bytes("ingest/pairs/part-0.parquet") == b"rows"
    assert remote_trial.read_json("ingest/manifest.json") == {"stage": "ingest"}


# -- a sweep --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tiny_run, s3):
    """The main run on S3: tests/tiny.yaml cut to ingest, train, evaluate, its ingest and `policy.model` the session's
    tiny run's (both uploaded)."""
    main = RunDir(f"{s3}/tune-run")
    main.upload_dir(tiny_run.path / "ingest", "ingest")
    main.upload_dir(tiny_run.path / "sft" / "model", "models", "sft")
    cfg = load_config(TINY, [f"run_dir={main.uri}", "stages=[ingest,train,evaluate]"])
    cfg.policy.model = main.uri_of("models", "sft")
    cfg.train = cfg.train.model_copy(update=TRAIN)
    cfg.evaluate = cfg.evaluate.model_copy(update={"samples_per_prompt": 1, "max_new_tokens": 8, "batch_size": 8})
    # Both trials at once: each trains on one of the session's 2 CPUs, and ASHA still compares them at step 5.
    cfg.tune = cfg.tune.model_validate(
        {"search_space": {"train.beta0": [0.05, 0.2]}, "grace_period": 5, "max_concurrent_trials": 2}
    )
    before = set(placement_group_table())
    summary = run_tune(cfg)
    leaked = [pg for key, pg in placement_group_table().items() if key not in before and pg["state"] != "REMOVED"]
    assert not leaked, leaked  # an early-stopped trial's train run released its workers' placement group
    return cfg, summary


def test_the_sweep_writes_its_table_and_the_best_config(sweep, tmp_path):
    cfg, summary = sweep
    main = RunDir(cfg.run_dir)
    rows = list(csv.DictReader(main.read_bytes("tune/results.csv").decode().splitlines()))
    assert sorted(float(r["train.beta0"]) for r in rows) == [0.05, 0.2]
    assert {r["status"] for r in rows} <= {"finished", "early-stopped"} and rows[0]["status"] == "finished"
    assert all(r["tail"] == "train evaluate" and float(r["eval_loss"]) > 0 for r in rows)
    assert all(int(r["steps"]) >= 5 for r in rows)  # the train loop's checkpoint reports reached Tune
    finished = [r for r in summary.rows if r.status == "finished"]
    assert summary.best is finished[0] and summary.best.metric == max(r.metric for r in finished)
    assert (
        "| rank | trial | train.beta0 | status | win_rate | eval_loss |" in main.read_bytes("tune/results.md").decode()
    )

    (tmp_path / "best_config.yaml").write_bytes(main.read_bytes("tune/best_config.yaml"))
    best = load_config(tmp_path / "best_config.yaml")
    assert best.train.beta0 == summary.best.overrides["train.beta0"] and best.run_dir == cfg.run_dir
    assert best.model_copy(update={"train": cfg.train, "tune": cfg.tune}) == cfg  # only the searched key differs
    summary_json = main.read_json("tune/summary.json")
    assert summary_json["best"]["name"] == summary.best.name and len(summary_json["trials"]) == 2
    assert main.read_json("tune/manifest.json")["best_trial"] == summary.best.name


def test_each_trial_runs_the_tail_in_its_own_run_dir_on_the_main_runs_upstream(sweep):
    cfg, summary = sweep
    main = RunDir(cfg.run_dir)
    pairs = sorted(
        info.path.rsplit("/", 1)[1] for info in main.fs.get_file_info(pafs.FileSelector(main.path("ingest", "pairs")))
    )
    for row in summary.rows:
        trial = RunDir(main.uri_of("tune", row.name))
        assert trial.read_json("ingest/manifest.json") == main.read_json("ingest/manifest.json")
        assert all(trial.read_bytes(f"ingest/pairs/{n}") == main.read_bytes(f"ingest/pairs/{n}") for n in pairs)
        if row.status == "finished":
            train = trial.read_json("train/manifest.json")
            assert train["config"]["train"]["beta0"] == row.overrides["train.beta0"]
            assert trial.exists("train", "tensorboard")
            assert trial.read_json("evaluate/manifest.json")["win_rate"] == pytest.approx(row.metric)
    assert not main.exists("train")  # the main run itself trained nothing
