"""The stage graph of raybpo/graph.py as one command: `raybpo run` (and `raybpo demo`).

    ingest -> sft -> reward -> breadth -> generate -> score -> depth -> train -> train-<variant>... -> evaluate
    (then the report)

`sft` runs before `reward` so a reward model can use the SFT policy as its backbone (`reward.model: sft`).
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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from raybpo import graph
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
    report: str | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def forget_from(cfg: Config, from_stage: str) -> list[str]:
    """Remove the manifests of `from_stage` and every later stage of the graph (with train, its variants)."""
    every = graph.steps(cfg)
    run_dir = RunDir(cfg.run_dir)
    later = every[graph.index_of(every, from_stage, "--from") :]
    removed = [step.name for step in later if run_dir.exists(step.name, MANIFEST)]
    for name in removed:
        run_dir.remove(name, MANIFEST)
    return removed


def run_pipeline(
    cfg: Config,
    from_stage: str | None = None,
    until_stage: str | None = None,
    on_stage: Callable[[int, int, StageRun], None] | None = None,
    callbacks: Mapping[str, Sequence[Any]] | None = None,
) -> PipelineResult:
    """Run the planned stages in order (see the module docstring); `on_stage` sees each as it ends.

    `callbacks` maps a stage name to the Ray Train callbacks of its TorchTrainer runs (its `StageContext`).
    """
    steps = graph.plan(cfg, from_stage, until_stage)
    if from_stage is not None:
        removed = forget_from(cfg, from_stage)
        log.info("--from %s: redoing %s", from_stage, ", ".join(removed) or "nothing finished yet")
    result = PipelineResult(cfg.run_dir)
    for index, step in enumerate(steps, start=1):
        log.info("[%d/%d] %s", index, len(steps), step.name)
        started = time.perf_counter()
        stage = step.run(StageContext(tuple((callbacks or {}).get(step.name, ()))))
        run = StageRun(step.name, step.stage.name, stage.manifest, stage.skipped, time.perf_counter() - started)
        result.stages.append(run)
        if on_stage is not None:
            on_stage(index, len(steps), run)
    if graph.JUDGED_BY in (step.name for step in steps):
        result.report = write_report(cfg.run_dir)[0]
    return result


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
