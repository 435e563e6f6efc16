"""What a training stage (sft, train, reward) does with its Ray Train run: fit, then export the best checkpoint.

`fit_and_export` runs `raybpo.train.loop.fit`, then `export_best` as a Ray task (the run's CPUs per worker, and a
GPU when it trained on GPUs): on whichever node Ray picks, it builds a fresh recipe's model, loads the best
checkpoint (downloaded there when the storage is remote), writes the model folders (safetensors with the
recipe's tokenizer, the LoRA adapter merged where asked) straight into the run directory, and returns the
recipe's row counts. The driver builds no model and holds no weights; it writes only the metric history (JSON
lines). `prepared_stage_counts` is the manifest part of the stages that train on prepared rows (sft, train).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from raybpo.artifacts import Parts, in_stage, prepared_inputs, relpath, training_metrics
from raybpo.config import LoopConfig
from raybpo.rundir import RunDir, StageCounts
from raybpo.train.loop import fit
from raybpo.train.recipe import Recipe


@dataclass(frozen=True)
class Trained:
    """A finished and exported run: its metric history, the recipe's row counts (`Recipe.counts`), the restarts
    it survived (`train_loop`'s `resumed_from` and `preemption_checkpoints` steps), and the metrics reported with
    the checkpoint that was exported."""

    history: list[dict[str, Any]]
    counts: dict[str, int]
    restarts: dict[str, list[int]]
    exported: dict[str, Any]

    def final(self, names: Collection[str]) -> dict[str, Any]:
        """The manifest's `steps`, `final_metrics` (those of `names`: the last logged step's), `restarts`, and
        `exported`: the step of the exported checkpoint and its metrics of `names` (the best checkpoint by eval
        loss need not be the last step)."""
        last = self.history[-1] if self.history else {}
        final_metrics = {k: v for k, v in last.items() if k in names}
        exported = {k: v for k, v in self.exported.items() if k in names}
        return {
            "steps": last.get("step"),
            "final_metrics": final_metrics,
            "restarts": self.restarts,
            "exported": {"step": self.exported.get("step"), "metrics": exported},
        }


def best_checkpoint(result, has_eval: bool) -> tuple[Any, dict[str, Any]]:
    """The run's best checkpoint by eval loss (the last one without an eval split), and the metrics reported with
    it."""
    checkpoint = result.get_best_checkpoint(metric="eval_loss", mode="min") if has_eval else result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {result.path} reported no checkpoint")
    metrics = next(m for c, m in result.best_checkpoints if c.path == checkpoint.path)
    return checkpoint, metrics


def export_best(
    factory: Callable[[], Recipe], checkpoint: Any, run_dir: str, folders: Mapping[Parts, bool], use_gpu: bool
) -> dict[str, int]:
    """Ray task: the `checkpoint` (a Ray Train checkpoint) loaded into a fresh recipe's model, saved with the
    recipe's tokenizer to each location `folders` names below `run_dir`, merged (`merge_and_unload`, after every
    unmerged folder is written) where its value is True; returns the recipe's `counts()`."""
    recipe = factory()
    model = recipe.build_model(torch.device("cuda" if use_gpu else "cpu"))
    with checkpoint.as_directory() as directory:  # read in place when local, else downloaded to this node
        recipe.load_model(model, Path(directory))
    target, merged = RunDir(run_dir), None
    with tempfile.TemporaryDirectory() as tmp:
        for parts, merge in sorted(folders.items(), key=lambda item: item[1]):  # merging changes the model: last
            if merge and merged is None:
                merged = model.merge_and_unload()
            local = Path(tmp) / relpath(parts)
            (merged if merge else model).save_pretrained(local, safe_serialization=True)
            recipe.tokenizer.save_pretrained(local)
            target.upload_dir(local, *parts)
    return recipe.counts()


def metrics_jsonl(history: list[dict[str, Any]]) -> bytes:
    """The metric history (logged and checkpointed steps) as JSON lines."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode()


def fit_and_export(
    name: str,
    factory: Callable[[], Recipe],
    loop_cfg: LoopConfig,
    seed: int,
    run_dir: RunDir,
    storage: str,
    has_eval: bool,
    *,
    folders: Mapping[Parts, bool],
    metrics: Parts,
    tensorboard: str | None = None,
    callbacks: Sequence[Any] = (),
) -> Trained:
    """`fit` (its arguments), then the best checkpoint exported by `export_best` to the run-directory locations
    `folders` (value True: merged); the metric history goes to `metrics` as JSON lines."""
    result = fit(name, factory, loop_cfg, seed, storage, has_eval, tensorboard, callbacks)
    export = ray.remote(export_best).options(
        num_cpus=loop_cfg.cpus_per_worker,
        num_gpus=1 if loop_cfg.use_gpu else 0,
        max_retries=1,
        scheduling_strategy="DEFAULT",  # not into the placement group of a caller such as a Tune trial
    )
    checkpoint, exported = best_checkpoint(result, has_eval)
    counts = ray.get(export.remote(factory, checkpoint, run_dir.uri, dict(folders), loop_cfg.use_gpu))
    returned = result.return_value
    run_dir.write_bytes(relpath(metrics), metrics_jsonl(returned["history"]))
    return Trained(
        returned["history"],
        counts,
        {key: returned[key] for key in ("resumed_from", "preemption_checkpoints")},
        exported,
    )


def prepared_stage_counts(
    stage: str,
    rows_in: int,
    counts: dict[str, int],
    trained: Trained,
    final_metrics: Collection[str],
    outputs: dict[str, str],
    **extra: Any,
) -> StageCounts:
    """The manifest counts of a stage that trained on `prepare`'s rows (`counts`): rows kept and quarantined,
    `extra`, the steps and `final_metrics`, and `outputs` with the metrics and the prepared rows added."""
    return StageCounts(
        rows_in=rows_in,
        rows_out=counts["train"] + counts["eval"],
        rows_quarantined=counts["does_not_fit"],
        quarantine_reasons={"does_not_fit": counts["does_not_fit"]} if counts["does_not_fit"] else {},
        extra={
            **extra,
            **trained.final(final_metrics),
            "outputs": {
                **outputs,
                "metrics": in_stage(training_metrics(stage)),
                "prepared": in_stage(prepared_inputs(stage), folder=True),
            },
        },
    )
