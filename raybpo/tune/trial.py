"""One `raybpo tune` trial: its run directory seeded from the main run, its tail, and ASHA's early stop, which
the trial's own train run carries out."""

from __future__ import annotations

import math
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from raybpo.artifacts import EVALUATE, TRAIN, TUNE
from raybpo.config import Config, TuneConfig, with_overrides
from raybpo.graph import plan
from raybpo.pipeline import run_pipeline
from raybpo.rundir import MANIFEST, RunDir, read_manifest
from raybpo.tune.search import SEARCH_SPACE

FINISHED, EARLY_STOPPED, FAILED = "finished", "early-stopped", "failed"
MAX_STEPS = 10**9  # ASHA's max_t: no trial is cut for its length, only at rungs


def copy_stage(source: RunDir, target: RunDir, stage: str) -> None:
    """Copy a finished stage folder, its manifest last, so a copy cut short is a partial stage (redone).

    Two local run dirs share the files as hard links: a stage never rewrites a finished stage's files (a
    redo deletes the folder first). Within one object store each file is copied by the store itself
    (`copy_file`: S3's CopyObject, no bytes through this process); across filesystems it streams through pyarrow.
    """
    root = source.path(stage)
    infos = source.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i.path for i in infos if i.type == pafs.FileType.File), key=lambda p: p.endswith("/" + MANIFEST))
    same_store = not source.is_local() and source.fs.equals(target.fs)
    for path in files:
        destination = target.path(stage, posixpath.relpath(path, root))
        target.fs.create_dir(posixpath.dirname(destination), recursive=True)
        if source.is_local() and target.is_local():
            try:
                os.link(path, destination)
                continue
            except OSError:  # another device, or links unsupported: copy
                pass
        if same_store:
            source.fs.copy_file(path, destination)
        else:
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
        manifest = read_manifest(main, stage)
        if manifest is None:
            break
        if manifest["config_hash"] != step.cfg.section_hash(*(s for s in manifest["config"] if s != "seed")):
            break
        if read_manifest(trial, stage) != manifest:
            trial.remove(stage)
            copy_stage(main, trial, stage)
        kept.append(stage)
    return kept


def final_metrics(run_dir: RunDir) -> dict[str, float]:
    """What a finished trial ends with: the train stage's final metrics, then the evaluate stage's."""
    metrics: dict[str, float] = {}
    for stage in (TRAIN, EVALUATE):
        metrics.update((read_manifest(run_dir, stage) or {}).get("final_metrics", {}))
    return metrics


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
