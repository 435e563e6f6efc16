"""The stage graph of raybpo/graph.py as one command: `raybpo run` (and `raybpo demo`).

    ingest -> sft -> reward -> breadth -> generate -> score -> depth -> train -> train-<variant>... -> evaluate
    (then the report)

A stage starts once the stages it reads are done (`graph.waits_for`), so independent ones run at once, up to
`ray.parallel_stages` (4; 1 runs them one at a time in this order): sft, reward and breadth after ingest (reward
waits for sft when the SFT policy is its backbone, `reward.model: sft`), train beside its variants.
The config's `stages` names the stages a run has (all by default; a plain beta-DPO run drops breadth to depth,
and train then reads the ingested pairs); `evaluate.variants` adds a stage `train-<name>` per variant after train
(`graph.plan`). Every stage skips itself when its manifest matches its config and inputs, so a rerun after a
crash redoes only the stage that died and those after it. `from_stage` forces a stage and everything after it
to be redone (their manifests are removed first: with `train`, the variants too); `until_stage` stops after a
stage. Both take a stage or a variant's `train-<name>`. The report is rewritten at the end of every run that
reaches `evaluate`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from raybpo import graph
from raybpo.artifacts import CHECKPOINTS
from raybpo.config import Config
from raybpo.report import write_report
from raybpo.rundir import MANIFEST, RunDir, StageContext

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """One stage of a pipeline run: its manifest, whether it was skipped, and the seconds this run spent."""

    name: str
    stage: str  # the stage of the graph it ran (`train` for a variant `train-<name>`)
    manifest: dict[str, Any]
    skipped: bool
    seconds: float


@dataclass
class PipelineResult:
    run_dir: str
    stages: list[StageRun] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the run (stages that ran at once overlap)
    report: str | None = None


def forget_from(cfg: Config, from_stage: str) -> list[str]:
    """Remove the manifests of `from_stage` and every later stage of the graph (with train, its variants), and
    move their training runs' checkpoints aside into `checkpoints/replaced-<UTC time>/`: a forced training stage
    trains again from its first step instead of resuming (and re-exporting) the run it replaces."""
    every = graph.steps(cfg)
    run_dir = RunDir(cfg.run_dir)
    later = every[graph.index_of(every, from_stage, "--from") :]
    removed = [step.name for step in later if run_dir.exists(step.name, MANIFEST)]
    for name in removed:
        run_dir.remove(name, MANIFEST)
    aside = f"replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    for folder in run_dir.folders(CHECKPOINTS):
        if any(folder.startswith(f"{step.name}-") for step in later):
            run_dir.move((CHECKPOINTS, folder), (CHECKPOINTS, aside, folder))
            log.info("--from %s: checkpoints %s moved to %s/%s/", from_stage, folder, CHECKPOINTS, aside)
    return removed


def run_pipeline(
    cfg: Config,
    from_stage: str | None = None,
    until_stage: str | None = None,
    on_stage: Callable[[int, int, StageRun], None] | None = None,
    callbacks: Mapping[str, Sequence[Any]] | None = None,
) -> PipelineResult:
    """Run the planned stages (see the module docstring); `on_stage` sees each as it ends.

    `callbacks` maps a stage name to the Ray Train callbacks of its TorchTrainer runs (its `StageContext`).
    """
    steps = graph.plan(cfg, from_stage, until_stage)
    if from_stage is not None:
        removed = forget_from(cfg, from_stage)
        log.info("--from %s: redoing %s", from_stage, ", ".join(removed) or "nothing finished yet")
    index = {step.name: i for i, step in enumerate(steps, start=1)}

    def start(step: graph.Step) -> StageRun:
        log.info("[%d/%d] %s", index[step.name], len(steps), step.name)
        started = time.perf_counter()
        stage = step.run(StageContext(tuple((callbacks or {}).get(step.name, ()))))
        return StageRun(step.name, step.stage.name, stage.manifest, stage.skipped, time.perf_counter() - started)

    def done(run: StageRun) -> None:
        if on_stage is not None:
            on_stage(index[run.name], len(steps), run)

    started = time.perf_counter()
    result = PipelineResult(cfg.run_dir, run_steps(steps, cfg.ray.parallel_stages, start, done))
    if graph.JUDGED_BY in index:
        result.report = write_report(cfg.run_dir)[0]
    result.seconds = time.perf_counter() - started
    return result


def run_steps(
    steps: list[graph.Step],
    parallel: int,
    start: Callable[[graph.Step], StageRun],
    done: Callable[[StageRun], None],
) -> list[StageRun]:
    """Run every step once the steps it waits for (`graph.waits_for`) are done, at most `parallel` at a time, and
    return their runs in plan order; `done` sees each run as it ends, in this thread.

    A step that is the only one able to run runs in this thread (with `parallel` 1, every step does, in plan
    order); steps that can run at once run in threads of their own (daemons: Ctrl-C ends the command) and share
    the cluster through Ray's resources. After a failure no step starts; the running ones finish and keep their
    manifests, then the first error is raised.
    """
    waits = graph.waits_for(steps)
    runs: dict[str, StageRun] = {}
    pending, running = list(steps), set()
    ended: queue.Queue[tuple[str, StageRun | BaseException]] = queue.Queue()
    error: BaseException | None = None
    while pending or running:
        ready = [] if error else [s for s in pending if set(waits[s.name]) <= runs.keys()][: parallel - len(running)]
        if len(ready) == 1 and not running:
            pending.remove(ready[0])
            runs[ready[0].name] = run = start(ready[0])
            done(run)
            continue
        if ready:
            log.info("running at once: %s", ", ".join(sorted(running | {s.name for s in ready})))
        for step in ready:
            pending.remove(step)
            running.add(step.name)
            thread = threading.Thread(target=_in_thread, args=(step, start, ended), name=f"stage-{step.name}")
            thread.daemon = True
            thread.start()
        if not running:
            break  # a failure, and nothing left running
        name, outcome = ended.get()
        running.discard(name)
        if isinstance(outcome, BaseException):
            error = error or outcome
            log.error("%s failed%s", name, f"; waiting for {', '.join(sorted(running))} to end" if running else "")
        else:
            runs[name] = outcome
            done(outcome)
    if error is not None:
        raise error
    return [runs[step.name] for step in steps]


def _in_thread(
    step: graph.Step,
    start: Callable[[graph.Step], StageRun],
    ended: queue.Queue[tuple[str, StageRun | BaseException]],
) -> None:
    try:
        ended.put((step.name, start(step)))
    except BaseException as err:  # handed to the scheduling thread, which raises it
        ended.put((step.name, err))


HEADLINES = {
    "sft": ("eval_loss",),
    "train": ("rewards/accuracies", "rewards/margins", "eval_loss"),
    "evaluate": ("win_rate",),
}


def headline(run: StageRun) -> str:
    """The one number that says how a stage went, for the summary table."""
    m = run.manifest
    if run.name == "reward" and "evaluation" in m:
        models = m["evaluation"]["models"]
        return "; ".join(f"{n}: acc {v['mean_accuracy']:.3f}, ECE {v['ece']:.3f}" for n, v in models.items())
    if run.name == "breadth":
        return f"{m['rows_out']} of {m['prompts_distinct']} prompts in {m['num_clusters']} clusters"
    if run.name == "depth":
        return f"{m['budget']} pairs for {m['prompts']} prompts ({m['selection']}, K_g={m['num_clusters']})"
    if run.name == "score":
        return f"{m['pairs']} candidate pairs ({m['scorer']})"
    if run.stage in HEADLINES:
        final = m.get("final_metrics", {})
        values = [(key, final.get(key)) for key in HEADLINES[run.stage]]
        return ", ".join(f"{key} {value:.3f}" for key, value in values if isinstance(value, float))
    return ""


def summary_table(result: PipelineResult) -> str:
    """One screen: rows and wall time per stage, headline metrics, and where the report is."""
    lines = [f"{'stage':<14} {'state':<8} {'rows in':>8} {'rows out':>9} {'quar.':>6} {'wall s':>8}  headline"]
    for run in result.stages:
        m = run.manifest
        state = "skipped" if run.skipped else "done"
        wall = m.get("wall_time_s", 0.0)
        lines.append(
            f"{run.name:<14} {state:<8} {m['rows_in']:>8} {m['rows_out']:>9} {m['rows_quarantined']:>6} "
            f"{wall:>8.1f}  {headline(run)}"
        )
    lines.append(f"this run: {result.seconds:.1f} s; run directory: {result.run_dir}")
    if result.report:
        lines.append(f"report: {result.report} (and report.html beside it)")
    return "\n".join(lines)
