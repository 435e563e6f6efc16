"""What a training stage (sft, train, reward) does with its Ray Train run: fit, load the best checkpoint, export.

`fit_and_export` runs `raybpo.train.loop.fit`, loads the run's best checkpoint into a fresh recipe's model on
the driver and writes the model folders (safetensors with the recipe's tokenizer, the LoRA adapter merged where
asked) and the metric history (JSON lines) into local paths the stage uploads. `prepared_stage_counts` is the
manifest part of the stages that train on prepared rows (sft, train).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raybpo.artifacts import in_stage, prepared_inputs, training_metrics
from raybpo.config import LoopConfig
from raybpo.models.tiny import GLOBAL_RNG
from raybpo.rundir import StageCounts
from raybpo.train.loop import Recipe, fit


@dataclass(frozen=True)
class Trained:
    """A finished run: the driver's recipe (its model built, the best checkpoint loaded) and the metric history."""

    recipe: Recipe
    history: list[dict[str, Any]]

    def final(self, names: Collection[str]) -> dict[str, Any]:
        """The manifest's `steps` and `final_metrics` (those of `names`): the last logged step's."""
        last = self.history[-1] if self.history else {}
        return {"steps": last.get("step"), "final_metrics": {k: v for k, v in last.items() if k in names}}


def best_checkpoint(result, has_eval: bool):
    """The run's best checkpoint by eval loss (the last one without an eval split)."""
    checkpoint = result.get_best_checkpoint(metric="eval_loss", mode="min") if has_eval else result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {result.path} reported no checkpoint")
    return checkpoint


def load_trained(factory: Callable[[], Recipe], result, has_eval: bool) -> tuple[Recipe, nn.Module]:
    """A fresh recipe and its model on CPU with the run's best checkpoint loaded, read in place where it is local
    (`as_directory`: a remote one is downloaded to a temporary folder that is removed again)."""
    checkpoint = best_checkpoint(result, has_eval)
    recipe = factory()
    with GLOBAL_RNG:  # initial weights are overwritten below, but drawn from the RNG a tiny model may be seeding
        model = recipe.build_model(torch.device("cpu"))
    with checkpoint.as_directory() as directory:
        recipe.load_model(model, Path(directory))
    return recipe, model


def metrics_jsonl(history: list[dict[str, Any]]) -> bytes:
    """The metric history (logged and checkpointed steps) as JSON lines."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode()


def fit_and_export(
    name: str,
    factory: Callable[[], Recipe],
    loop_cfg: LoopConfig,
    seed: int,
    storage: str,
    has_eval: bool,
    *,
    folders: Mapping[Path, bool],
    metrics: Path,
    tensorboard_dir: str | None = None,
    callbacks: Sequence[Any] = (),
) -> Trained:
    """`fit` (its arguments), then the best checkpoint exported: each local folder of `folders` gets the model,
    merged (`merge_and_unload`, after every unmerged folder is written) where its value is True, and the recipe's
    tokenizer; the local file `metrics` gets the metric history as JSON lines."""
    result = fit(name, factory, loop_cfg, seed, storage, has_eval, tensorboard_dir, callbacks)
    recipe, model = load_trained(factory, result, has_eval)
    merged = None
    for folder, merge in sorted(folders.items(), key=lambda item: item[1]):  # merging changes the model: last
        if merge and merged is None:
            merged = model.merge_and_unload()
        (merged if merge else model).save_pretrained(folder, safe_serialization=True)
        recipe.tokenizer.save_pretrained(folder)
    history = result.return_value["history"]
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_bytes(metrics_jsonl(history))
    return Trained(recipe, history)


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
