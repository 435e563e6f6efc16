"""`raybpo tune`: Ray Tune over any config keys, each trial the pipeline's tail in its own run directory.

    summary = run_tune(load_config("demo.yaml", ["tune.search_space.train.beta0=[0.05,0.1,0.2]"]))

Search space: `tune.search_space` maps dotted config keys (any key of the config except run_dir, stages, ray.*
and tune.*) to the values to try. Every value is checked against the config schema before anything runs, so a
wrong key or value fails at once, naming it. `tune.search: grid` runs every combination once; `random` runs
`tune.num_samples` distinct combinations drawn with the config's seed. Tune gets the trials as one
`tune.grid_search` list, and a trial is named by its settings (`trial-<hash>`), so a rerun meets its own folders.

Trials: a trial is `raybpo run` with the trial's config in `<run_dir>/tune/<trial>/`. First the main run
finishes (or skips, when done) every stage before the first planned stage that reads a searched key (the
graph's `Step.reads_key`: the config sections a stage hashes, for a variant `train-<name>` also
`evaluate.variants.<name>`; `seed` is read by all). A trial's run directory then starts with copies of the main
run's finished stages that the trial's config leaves up to date: the longest prefix of the planned stages whose
manifest hash equals the one the trial's config gives (hard links on a local run dir, the object store's own
copy within one (S3 CopyObject), else copies through pyarrow; the manifest last). The pipeline skips those and
runs the rest, the tail. The manifests decide, so a tail can start before a key's own stage: depth records
train's LoRA and length settings among its inputs (its gradient features use them), so a `train.lora_rank`
sweep redoes depth while a `train.beta0` one starts
at train.

Early stopping: with `tune.early_stop_metric` (default eval_loss, mode `early_stop_mode`) ASHA compares the
trials on the train stage's reports that hold that metric, the checkpoint steps where the loop evaluates, with
the optimizer `step` as its time (`tune.grace_period` steps before a first cut, `tune.reduction_factor`). The
reports reach Tune through Ray Train V2's `TuneReportCallback` on the TorchTrainer each trial launches (the
documented Train-in-Tune pattern: a function trainable creating the trainer, here through `run_pipeline(...,
callbacks=...)`, the train stage's `StageContext` and `fit(callbacks=...)`). ASHA's stop is carried out by the
trial: its train run ends at its next report through Ray Train's own shutdown (Tune killing the trial actor
under a running TorchTrainer would leave the run's placement group reserved on a Ray without a dashboard), and
the trial is recorded as early-stopped. eval_loss is the DPO loss at each trial's own beta0 and loss type: when
those are searched, early-stop on another metric (e.g. `rewards/accuracies`, max) or set it to null.

Ranking: finished trials by `tune.metric` in `tune.mode` (the evaluate stage's win_rate, ci_low or ci_high, or
one of the train stage's final metrics); early-stopped and failed trials come last.

Resources: a trial's driver reserves no CPU (`tune.trial_resources`; a placement-group bundle cannot be empty,
so it holds a token of Ray's logical memory): it only launches the stages, whose Ray Data and Ray Train workers
reserve their own. `tune.max_concurrent_trials` (default 1) bounds the trials in flight; each trial's train
stage needs all its workers' resources at once.

Outputs in `<run_dir>/tune/`: `results.csv` and `results.md` (a row per trial, best first), `best_config.yaml`
(the best trial's whole config, run_dir the main run's: `raybpo run --config best_config.yaml`), `summary.json`,
`manifest.json` (written last, read by the report), the trial run directories, and Ray Tune's own folder `ray/`.
"""

from __future__ import annotations

import os
import time

import ray
import ray.tune

from raybpo.artifacts import TUNE
from raybpo.cluster import init_ray
from raybpo.config import Config, with_overrides
from raybpo.graph import plan
from raybpo.pipeline import StageRun, run_pipeline
from raybpo.rundir import RunDir
from raybpo.tune.results import TrialLines, TuneSummary, rank, trial_row, write_outputs
from raybpo.tune.search import SEARCH_SPACE, check_search, describe, trial_folder, trial_overrides
from raybpo.tune.trial import StopBoard, make_scheduler, run_trial

EXPERIMENT = "ray"  # Ray Tune's own folder below <run_dir>/tune/


def _stage_line(index: int, total: int, run: StageRun) -> None:
    print(f"  {run.name}: {'up to date, skipped' if run.skipped else f'done in {run.seconds:.1f} s'}", flush=True)


def run_tune(cfg: Config) -> TuneSummary:
    """Sweep `tune.search_space` (see the module docstring); prints a line per trial, then the table."""
    started = time.perf_counter()
    first = check_search(cfg)
    trials = trial_overrides(cfg)
    for overrides in trials:  # the combinations too (e.g. batch_size with micro_batch_size)
        with_overrides(cfg, overrides, SEARCH_SPACE)
    main = RunDir(cfg.run_dir)
    if cfg.tune.early_stop_metric == "eval_loss" and {"train.beta0", "train.loss"} & set(cfg.tune.search_space):
        print("note: eval_loss is the loss at each trial's own beta0 and loss type, so ASHA compares unlike scales")
    init_ray(cfg.ray)
    planned = [step.name for step in plan(cfg)]
    upstream = planned[: planned.index(first)]
    if upstream:
        print(f"main run: {', '.join(upstream)} (the stages every trial shares)", flush=True)
        run_pipeline(cfg, until_stage=upstream[-1], on_stage=_stage_line)
    print(f"tune: {len(trials)} trials, each from {first} on in {main.uri_of(TUNE)}/<trial>/", flush=True)
    main.remove(TUNE, EXPERIMENT)
    board = StopBoard.remote()
    tc = cfg.tune
    trainable = ray.tune.with_parameters(
        run_trial, base=cfg.model_dump(mode="json"), main_run_dir=main.uri_of(), cwd=os.getcwd(), board=board
    )
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, dict(tc.trial_resources)),
        param_space={"overrides": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(
            scheduler=make_scheduler(tc, board),
            max_concurrent_trials=tc.max_concurrent_trials,
            trial_name_creator=trial_folder,
            trial_dirname_creator=trial_folder,
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=EXPERIMENT,
            storage_path=main.uri_of(TUNE),
            verbose=0,
            callbacks=[TrialLines(tc.metric, tc.early_stop_metric)],
        ),
    )
    try:
        grid = tuner.fit()
    finally:
        ray.kill(board)
    rows = rank([trial_row(result, cfg, main) for result in grid], tc.mode)
    summary = write_outputs(cfg, main, rows, first, time.perf_counter() - started)
    print("\n" + main.read_bytes(f"{TUNE}/results.md").decode())
    if summary.best is None:
        print("no trial finished with a metric: no best config")
    else:
        print(f"best: {summary.best.name} ({describe(summary.best.overrides)}) -> {summary.outputs['best_config']}")
    return summary
