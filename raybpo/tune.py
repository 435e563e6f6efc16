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
manifest hash equals the one the trial's config gives (hard links on a local run dir, copies through pyarrow
otherwise; the manifest last). The pipeline skips those and runs the rest, the tail. The manifests decide, so
a tail can start before a key's own stage: depth records train's LoRA and length settings among its inputs
(its gradient features use them), so a `train.lora_rank` sweep redoes depth while a `train.beta0` one starts
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

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import random
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from raybpo.artifacts import EVALUATE, TRAIN, TUNE
from raybpo.cluster import init_ray
from raybpo.config import Config, ConfigError, TuneConfig, with_overrides
from raybpo.graph import plan
from raybpo.pipeline import StageRun, run_pipeline
from raybpo.rundir import MANIFEST, RunDir, package_versions
from raybpo.tables import markdown_table
from raybpo.train.dpo import FINAL_METRICS

EXPERIMENT = "ray"  # Ray Tune's own folder below <run_dir>/tune/
FINISHED, EARLY_STOPPED, FAILED = "finished", "early-stopped", "failed"
EVALUATE_METRICS = ("win_rate", "ci_low", "ci_high")
NOT_SEARCHABLE = ("run_dir", "stages", "ray", "tune")
SEARCH_SPACE = "tune.search_space"  # names the overrides in errors
MAX_STEPS = 10**9  # ASHA's max_t: no trial is cut for its length, only at rungs


# -- the search space -----------------------------------------------------------------------------------------


def check_search(cfg: Config) -> str:
    """Check the search space and the metrics before anything runs; returns the first stage a searched key reads."""
    space = cfg.tune.search_space
    if not space:
        raise ConfigError(
            "tune.search_space is empty: give dotted keys and values, e.g. tune.search_space.train.beta0=[0.05,0.2]"
        )
    steps = plan(cfg)
    planned = [step.name for step in steps]
    firsts = []
    for key, values in space.items():
        section = key.split(".", 1)[0]
        if section in NOT_SEARCHABLE:
            raise ConfigError(f"tune.search_space.{key}: run_dir, stages, ray.* and tune.* are fixed for a sweep")
        seen = [json.dumps(value, sort_keys=True) for value in values]
        if len(set(seen)) < len(seen):
            raise ConfigError(f"tune.search_space.{key}: a value is listed twice in {values}")
        for value in values:
            with_overrides(cfg, {key: value}, SEARCH_SPACE)
        readers = [step.name for step in steps if step.reads_key(key)]
        if not readers:
            raise ConfigError(
                f"tune.search_space.{key}: none of the config's stages ({', '.join(planned)}) reads {section}.*"
            )
        firsts.append(readers[0])
    metrics = {**dict.fromkeys(EVALUATE_METRICS, EVALUATE), **dict.fromkeys(FINAL_METRICS, TRAIN)}
    if cfg.tune.metric not in metrics:
        raise ConfigError(f"tune.metric {cfg.tune.metric!r} is not a final metric; choose one of {', '.join(metrics)}")
    if metrics[cfg.tune.metric] not in planned:
        raise ConfigError(f"tune.metric {cfg.tune.metric}: the {metrics[cfg.tune.metric]} stage is not in the stages")
    early = cfg.tune.early_stop_metric
    if early is not None and early not in FINAL_METRICS:
        raise ConfigError(f"tune.early_stop_metric {early!r} is not a train metric; choose one of {FINAL_METRICS}")
    return min(firsts, key=planned.index)


def trial_overrides(cfg: Config) -> list[dict[str, Any]]:
    """Every trial's settings (dotted key -> value) in order: the whole grid, or `num_samples` seeded draws."""
    keys, lists = list(cfg.tune.search_space), list(cfg.tune.search_space.values())
    total = math.prod(len(values) for values in lists)
    indices: range | list[int] = range(total)
    if cfg.tune.search == "random":
        if cfg.tune.num_samples > total:
            raise ConfigError(f"tune.num_samples={cfg.tune.num_samples} exceeds the {total} combinations: use a grid")
        indices = random.Random(cfg.seed).sample(range(total), cfg.tune.num_samples)
    trials = []
    for index in indices:
        chosen = {}
        for key, values in reversed(list(zip(keys, lists, strict=True))):
            index, position = divmod(index, len(values))
            chosen[key] = values[position]
        trials.append({key: chosen[key] for key in keys})
    return trials


def trial_name(overrides: dict[str, Any]) -> str:
    """A trial's folder name, a function of its settings: `trial-` and 10 hex digits."""
    return "trial-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def _folder(trial: Any) -> str:
    return trial_name(trial.config["overrides"])


def describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())


# -- a trial's run directory ------------------------------------------------------------------------------------


def copy_stage(source: RunDir, target: RunDir, stage: str) -> None:
    """Copy a finished stage folder, its manifest last, so a copy cut short is a partial stage (redone).

    Two local run dirs share the files as hard links: a stage never rewrites a finished stage's files (a
    redo deletes the folder first). Otherwise each file is copied through pyarrow (s3://, gs://, ...).
    """
    root = source.path(stage)
    infos = source.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i.path for i in infos if i.type == pafs.FileType.File), key=lambda p: p.endswith("/" + MANIFEST))
    for path in files:
        destination = target.path(stage, posixpath.relpath(path, root))
        target.fs.create_dir(posixpath.dirname(destination), recursive=True)
        if source.is_local() and target.is_local():
            try:
                os.link(path, destination)
                continue
            except OSError:  # another device, or links unsupported: copy
                pass
        pafs.copy_files(path, destination, source_filesystem=source.fs, destination_filesystem=target.fs)


def seed_trial(main: RunDir, cfg: Config) -> list[str]:
    """Give the trial's run dir the main run's finished stages that `cfg` leaves up to date; returns them.

    They are the longest prefix of the planned stages whose main manifest records the config hash the stage's config
    (a variant's: its overrides applied) gives the same sections: the pipeline then skips them (their input hashes
    match, as the prefix is copied whole).
    """
    trial = RunDir(cfg.run_dir)
    kept = []
    for step in plan(cfg):
        stage = step.name
        if not main.exists(stage, MANIFEST):
            break
        manifest = main.read_json(f"{stage}/{MANIFEST}")
        if manifest["config_hash"] != step.cfg.section_hash(*(s for s in manifest["config"] if s != "seed")):
            break
        if not trial.exists(stage, MANIFEST) or trial.read_json(f"{stage}/{MANIFEST}") != manifest:
            trial.remove(stage)
            copy_stage(main, trial, stage)
        kept.append(stage)
    return kept


def final_metrics(run_dir: RunDir) -> dict[str, float]:
    """What a finished trial ends with: the train stage's final metrics, then the evaluate stage's."""
    metrics: dict[str, float] = {}
    for stage in (TRAIN, EVALUATE):
        if run_dir.exists(stage, MANIFEST):
            metrics.update(run_dir.read_json(f"{stage}/{MANIFEST}").get("final_metrics", {}))
    return metrics


# -- early stopping: ASHA, carried out by the trial's own train run ---------------------------------------------


@ray.remote(num_cpus=0)
class StopBoard:
    """The trials ASHA stopped: the driver's scheduler marks them, their train runs read it at each report."""

    def __init__(self) -> None:
        self._stopped: set[str] = set()

    def stop(self, trial_id: str) -> None:
        self._stopped.add(trial_id)

    def stopped(self, trial_id: str) -> bool:
        return trial_id in self._stopped


class CooperativeASHA(ASHAScheduler):
    """ASHA whose STOP the trial carries out: the decision goes to the `StopBoard`, Tune is told to continue."""

    def __init__(self, board: Any, **asha: Any):
        super().__init__(**asha)
        self._board = board

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if super().on_trial_result(tune_controller, trial, result) == self.STOP:
            self._board.stop.remote(trial.trial_id)
        return self.CONTINUE


def make_scheduler(tc: TuneConfig, board: Any) -> TrialScheduler:
    """ASHA on the early-stopping metric over the train stage's optimizer steps (carried out by the trials
    through `board`); plain FIFO without an early-stopping metric."""
    if tc.early_stop_metric is None:
        return FIFOScheduler()
    return CooperativeASHA(
        board,
        time_attr="step",
        metric=tc.early_stop_metric,
        mode=tc.early_stop_mode,
        max_t=MAX_STEPS,
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
        stop_last_trials=False,
    )


class EarlyStopped(RuntimeError):
    """Raised in the Ray Train controller to end a stopped trial's train run."""


class TrainToTune(TuneReportCallback):
    """Ray Train V2's `TuneReportCallback` on a trial's train run: forwards the reports holding the
    early-stopping metric (all of them without early stopping) and ends the run once ASHA stopped the trial."""

    def __init__(self, board: Any, trial_id: str, metric: str | None):
        super().__init__()
        self._board, self._trial_id, self._metric = board, trial_id, metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if ray.get(self._board.stopped.remote(self._trial_id)):
            raise EarlyStopped(f"trial {self._trial_id}: stopped early by ASHA")
        if self._metric is None or self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], base: dict[str, Any], main_run_dir: str, cwd: str, board: Any) -> None:
    """The Tune function trainable: one trial's tail in `<run_dir>/tune/<trial>/`, then its final report.

    The train stage's TorchTrainer gets `TrainToTune` as a Ray Train callback, handed down explicitly
    (`run_pipeline(callbacks=...)` -> the stage's `StageContext` -> `fit`); no other stage gets one.
    """
    if os.path.isdir(cwd):
        os.chdir(cwd)  # Tune starts a trial in its own folder; relative paths in the config are the caller's
    context = ray.tune.get_context()
    main = RunDir(main_run_dir)
    cfg = with_overrides(Config.model_validate(base), config["overrides"], SEARCH_SPACE)
    cfg.run_dir = main.uri_of(TUNE, context.get_trial_name())
    kept = seed_trial(main, cfg)
    tail = [step.name for step in plan(cfg) if step.name not in kept]
    callbacks = {TRAIN: [TrainToTune(board, context.get_trial_id(), cfg.tune.early_stop_metric)]}
    status = FINISHED
    try:
        run_pipeline(cfg, callbacks=callbacks)
    except Exception:
        if not ray.get(board.stopped.remote(context.get_trial_id())):
            raise
        status = EARLY_STOPPED
    metrics = final_metrics(RunDir(cfg.run_dir)) if status == FINISHED else {}
    names = {cfg.tune.metric, cfg.tune.early_stop_metric} - {None}
    # Every result holds ASHA's metric (Tune checks); without `step` ASHA leaves this one alone.
    ray.tune.report({"status": status, "tail": " ".join(tail), **{n: metrics.get(n, math.nan) for n in names}})


# -- the sweep -------------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One trial in the results table."""

    name: str
    overrides: dict[str, Any]
    status: str
    metric: float | None
    early_stop_metric: float | None
    steps: int | None
    wall_s: float | None
    tail: str
    run_dir: str
    error: str = ""


@dataclass
class TuneSummary:
    """The sweep: its rows best first, the best trial (None when no trial finished with a metric), the files."""

    rows: list[TrialRow]
    best: TrialRow | None
    outputs: dict[str, str]


class TrialLines(ray.tune.Callback):
    """One console line per trial as it ends (with the last train report it sent when it was stopped early)."""

    def __init__(self, metric: str, early_stop_metric: str | None):
        self._metric, self._early = metric, early_stop_metric
        self._last: dict[str, dict] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "step" in result:
            self._last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("status") == EARLY_STOPPED:
            last = self._last.get(trial.trial_id, {})
            shown = f"early-stopped at step {last.get('step')} ({self._early} {last.get(self._early, math.nan):.4g})"
        else:
            shown = f"{result.get('status')}, {self._metric} {result.get(self._metric, math.nan):.4g}"
        self._print(trial, f"{shown}, {result.get('time_total_s', 0.0):.1f} s")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trial, "failed (the error is in the table)")

    @staticmethod
    def _print(trial: Any, text: str) -> None:
        print(f"{trial_name(trial.config['overrides'])} ({describe(trial.config['overrides'])}): {text}", flush=True)


def early_column(tc: TuneConfig) -> str:
    """The table's training column: the early-stopping metric, or eval_loss without early stopping."""
    return tc.early_stop_metric or "eval_loss"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trial_row(result: Any, cfg: Config, main: RunDir) -> TrialRow:
    """A trial's row from its Tune result: status, final metric, and the last early-stopping metric it reported."""
    overrides = result.config["overrides"]
    final = result.metrics or {}
    status = FAILED if result.error is not None else final.get("status", FAILED)
    column, early, steps = early_column(cfg.tune), None, None
    frame = result.metrics_dataframe
    if frame is not None and "step" in frame:
        reports = frame[frame["step"].notna()]
        steps = int(reports["step"].max()) if len(reports) else None
        if column in reports and reports[column].notna().any():
            early = _number(reports[column].dropna().iloc[-1])
    if early is None:
        early = _number(final.get(column))
    error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else ""
    return TrialRow(
        name=trial_name(overrides),
        overrides=overrides,
        status=status,
        metric=_number(final.get(cfg.tune.metric)) if status == FINISHED else None,
        early_stop_metric=early,
        steps=steps,
        wall_s=_number(final.get("time_total_s")),
        tail=final.get("tail", ""),
        run_dir=main.uri_of(TUNE, trial_name(overrides)),
        error=error,
    )


def rank(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Finished trials with a metric best first, then the other finished, early-stopped, failed ones."""
    sign = -1.0 if mode == "max" else 1.0
    order = {FINISHED: 0, EARLY_STOPPED: 1, FAILED: 2}
    return sorted(
        rows, key=lambda r: (order[r.status], r.metric is None, sign * r.metric if r.metric is not None else 0.0)
    )


def table(rows: list[TrialRow], cfg: Config) -> tuple[list[str], list[list[str]]]:
    """The results table's header and cells (best first)."""
    keys = list(cfg.tune.search_space)
    header = ["rank", "trial", *keys, "status", cfg.tune.metric, early_column(cfg.tune)]
    header += ["steps", "wall_s", "tail", "error"]

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [
        [
            str(i),
            r.name,
            *(json.dumps(r.overrides[k]) for k in keys),
            r.status,
            cell(r.metric),
            cell(r.early_stop_metric),
            cell(r.steps),
            cell(r.wall_s),
            r.tail,
            r.error,
        ]
        for i, r in enumerate(rows, start=1)
    ]
    return header, cells


def write_outputs(cfg: Config, main: RunDir, rows: list[TrialRow], first: str, seconds: float) -> TuneSummary:
    """results.csv, results.md, best_config.yaml, summary.json, then manifest.json (last)."""
    best = rows[0] if rows and rows[0].status == FINISHED and rows[0].metric is not None else None
    header, cells = table(rows, cfg)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *cells])
    main.write_bytes(f"{TUNE}/results.csv", buffer.getvalue().encode())
    rule = (
        f"ASHA on {cfg.tune.early_stop_metric} ({cfg.tune.early_stop_mode}) at the train stage's checkpoint steps"
        if cfg.tune.early_stop_metric
        else "no early stopping"
    )
    note = f"Ranked by {cfg.tune.metric} ({cfg.tune.mode}); {rule}; {early_column(cfg.tune)}: the last one reported."
    text = f"# Tune: {len(rows)} trials\n\n{markdown_table(header, cells)}\n\n{note}\n"
    main.write_bytes(f"{TUNE}/results.md", text.encode())
    outputs = {"results": "results.csv", "table": "results.md", "summary": "summary.json"}
    if best is not None:
        best_cfg = with_overrides(cfg, best.overrides, SEARCH_SPACE).model_dump(mode="json")
        comment = f"# best of `raybpo tune` ({cfg.tune.metric} {best.metric:.4g}): {describe(best.overrides)}\n"
        main.write_bytes(f"{TUNE}/best_config.yaml", (comment + yaml.safe_dump(best_cfg, sort_keys=False)).encode())
        outputs["best_config"] = "best_config.yaml"
    summary = {
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "early_stopping": rule,
        "search": cfg.tune.search,
        "search_space": cfg.tune.search_space,
        "first_stage": first,
        "best": asdict(best) if best else None,
        "trials": [asdict(r) for r in rows],
        "wall_time_s": round(seconds, 3),
    }
    main.write_json(f"{TUNE}/summary.json", summary)
    failed = sum(r.status == FAILED for r in rows)
    main.write_json(
        f"{TUNE}/{MANIFEST}",
        {
            "stage": TUNE,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"seed": cfg.seed, TUNE: cfg.tune.model_dump(mode="json")},
            "config_hash": cfg.section_hash(TUNE),
            "input_hashes": {},
            "rows_in": len(rows),
            "rows_out": sum(r.status == FINISHED for r in rows),
            "rows_quarantined": failed,
            "quarantine_reasons": {FAILED: failed} if failed else {},
            "final_metrics": {cfg.tune.metric: best.metric} if best else {},
            "best_trial": best.name if best else None,
            "outputs": outputs,
            "wall_time_s": round(seconds, 3),
            "versions": package_versions(),
        },
    )
    return TuneSummary(rows, best, {k: main.uri_of(TUNE, v) for k, v in outputs.items()})


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
            trial_name_creator=_folder,
            trial_dirname_creator=_folder,
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
