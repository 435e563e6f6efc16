"""The stage graph of docs/ARCHITECTURE.md as one command: `raybpo run` (and `raybpo demo`).

    ingest -> sft -> reward -> breadth -> generate -> score -> depth -> train -> evaluate   (then the report)

`sft` runs before `reward` so a reward model can use the SFT policy as its backbone (`reward.model: sft`).
The config's `stages` names the stages a run has (all by default; a plain beta-DPO run drops breadth to depth,
and train then reads the ingested pairs). Every stage skips itself when its manifest matches its config and
inputs, so a rerun after a crash redoes only the stage that died and those after it. `from_stage` forces a
stage and everything after it to be redone (their manifests are removed first, the variants' `train-*` with
`train`); `until_stage` stops after a stage. The report is rewritten at the end of every run that reaches
`evaluate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from raybpo.config import STAGE_ORDER, Config, ConfigError
from raybpo.rundir import MANIFEST, RunDir, StageContext, StageResult

log = logging.getLogger(__name__)


def stage_functions() -> dict[str, Callable[[Config, StageContext], StageResult]]:
    """Stage name -> the function that runs it (imported here: each stage pulls in its own dependencies)."""
    from raybpo.stages.breadth import run_breadth
    from raybpo.stages.depth import run_depth
    from raybpo.stages.evaluate import run_evaluate
    from raybpo.stages.generate import run_generate
    from raybpo.stages.ingest import ingest
    from raybpo.stages.score import run_score
    from raybpo.train.dpo import run_train
    from raybpo.train.reward import run_reward
    from raybpo.train.sft import run_sft

    return {
        "ingest": ingest,
        "sft": run_sft,
        "reward": run_reward,
        "breadth": run_breadth,
        "generate": run_generate,
        "score": run_score,
        "depth": run_depth,
        "train": run_train,
        "evaluate": run_evaluate,
    }


@dataclass
class StageRun:
    """One stage of a pipeline run: its manifest, whether it was skipped, and the seconds this run spent."""

    name: str
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


def planned_stages(cfg: Config, from_stage: str | None = None, until_stage: str | None = None) -> list[str]:
    """The configured stages in graph order, cut at `until_stage` (a stage of the graph, else a clear error)."""
    for name, value in (("--from", from_stage), ("--until", until_stage)):
        if value is not None and value not in STAGE_ORDER:
            raise ConfigError(f"{name} {value!r} is not a stage; the stages are {', '.join(STAGE_ORDER)}")
    if from_stage is not None and from_stage not in cfg.stages:
        raise ConfigError(f"--from {from_stage!r}: the config's stages ({', '.join(cfg.stages)}) do not include it")
    last = STAGE_ORDER.index(until_stage) if until_stage else len(STAGE_ORDER) - 1
    return [s for s in STAGE_ORDER if s in cfg.stages and STAGE_ORDER.index(s) <= last]


def forget_from(run_dir: RunDir, from_stage: str) -> list[str]:
    """Remove the manifests of `from_stage` and every later stage (and the `train-*` variants with train)."""
    later = STAGE_ORDER[STAGE_ORDER.index(from_stage) :]
    folders = list(later)
    if "train" in later and run_dir.exists():
        import pyarrow.fs as pafs

        infos = run_dir.fs.get_file_info(pafs.FileSelector(run_dir.root))
        folders += sorted(i.base_name for i in infos if i.base_name.startswith("train-"))
    removed = [name for name in folders if run_dir.exists(name, MANIFEST)]
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
    """Run the configured stages in order (see the module docstring); `on_stage` sees each as it ends.

    `callbacks` maps a stage name to the Ray Train callbacks of its TorchTrainer runs (its `StageContext`).
    """
    stages = planned_stages(cfg, from_stage, until_stage)
    run_dir = RunDir(cfg.run_dir)
    if from_stage is not None:
        removed = forget_from(run_dir, from_stage)
        log.info("--from %s: redoing %s", from_stage, ", ".join(removed) or "nothing finished yet")
    functions = stage_functions()
    result = PipelineResult(cfg.run_dir)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for index, name in enumerate(stages, start=1):
        log.info("[%d/%d] %s", index, len(stages), name)
        started = time.perf_counter()
        stage = functions[name](cfg, StageContext(tuple((callbacks or {}).get(name, ()))))
        run = StageRun(name, stage.manifest, stage.skipped, time.perf_counter() - started)
        result.stages.append(run)
        if on_stage is not None:
            on_stage(index, len(stages), run)
    if "evaluate" in stages:
        from raybpo.report import write_report

        for variant in cfg.evaluate.variants:  # trained inside the evaluate stage, listed after it
            name = f"train-{variant}"
            manifest = run_dir.read_json(f"{name}/{MANIFEST}")
            result.stages.append(StageRun(name, manifest, manifest["created_at"] < started_at, 0.0))

        result.report = write_report(run_dir)[0]
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
    if run.name.split("-")[0] in HEADLINES:
        final = m.get("final_metrics", {})
        values = [(key, final.get(key)) for key in HEADLINES[run.name.split("-")[0]]]
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
