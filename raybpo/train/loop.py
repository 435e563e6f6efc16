"""The data-parallel training loop on Ray Train, shared by SFT, DPO and reward models.

A `Recipe` supplies the model, the examples and the loss of a micro-batch; this loop supplies what
every stage needs: DDP (gloo on CPU, NCCL on GPU), gradient accumulation, AdamW with warm-up and
cosine decay, gradient clipping, bf16 autocast on GPU, a non-finite-loss guard, evaluation,
checkpoints through `ray.train.report`, resume, metrics on the console and in TensorBoard.

Exact multi-worker behaviour. The data plan is a pure function of (seed, epoch): length-bucketed
GLOBAL micro-batches of `micro_batch_size * num_workers` rows, `batch_size / that` of them per
optimizer step; worker r takes slice r of each. One worker with micro-batch `m * W` therefore sees
exactly the batches W workers with micro-batch `m` see together. The plan position is the step
number, so a resumed run continues with the very next batch.

A checkpoint holds the trainable weights (safetensors), the optimizer, scheduler and recipe state
(beta-DPO's M0 and sigma, MORE's momentum) in `optim.pt`, the loop state (step, the guard's count,
the metric history) in `trainer_state.json`, and every worker's RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raybpo.config import LoopConfig
from raybpo.models.logps import length_bucketed_batches

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class Workers:
    """This worker's place in the data-parallel group, and the collectives recipes may use."""

    rank: int
    world_size: int
    device: torch.device

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """All-gather a 1-D tensor of equal length on every worker, concatenated in rank order."""
        if self.world_size == 1:
            return values
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values.contiguous())
        return torch.cat(out)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values


class Recipe(ABC):
    """What a stage plugs into the loop."""

    #: sequence lengths of the training rows (for the default, length-bucketed plan)
    train_lengths: np.ndarray
    #: number of rows of the evaluation split
    num_eval: int

    @abstractmethod
    def build_model(self, device: torch.device) -> nn.Module:
        """The model to train; its parameters with requires_grad are what the optimizer updates."""

    @abstractmethod
    def loss(
        self, model: nn.Module, rows: list[int], workers: Workers, training: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of this worker's rows of a micro-batch (of the train or eval split), and metrics."""

    @abstractmethod
    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the trainable weights (safetensors) so `load_model` and the next stage can read them."""

    @abstractmethod
    def load_model(self, model: nn.Module, directory: Path) -> None: ...

    def plan(self, cfg: LoopConfig, seed: int) -> list[list[list[int]]]:
        """Every optimizer step's global micro-batches; by default length-bucketed (`step_plan`)."""
        return step_plan(self.train_lengths, cfg, seed)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def count_bad_steps(finite: bool, bad_steps: int, max_bad_steps: int, step: int) -> int:
    """The NaN/inf guard: a non-finite step is skipped; `max_bad_steps` of them in a row stop the run."""
    if finite:
        return 0
    if bad_steps + 1 >= max_bad_steps:
        raise NonFiniteLossError(
            f"{bad_steps + 1} optimizer steps in a row had a non-finite loss or gradient (max_bad_steps="
            f"{max_bad_steps}), the last at step {step}: lower the learning rate or check the data"
        )
    return bad_steps + 1


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def step_plan(lengths: np.ndarray, cfg: LoopConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step's global micro-batches (row indices), for all epochs."""
    per_micro = cfg.micro_batch_size * cfg.num_workers
    accumulation = cfg.batch_size // per_micro
    steps = []
    for epoch in range(cfg.epochs):
        micro = length_bucketed_batches(lengths, per_micro, seed, epoch)
        steps += [micro[i : i + accumulation] for i in range(0, len(micro) - accumulation + 1, accumulation)]
    return steps


class Checkpointer:
    """Write and read the loop's checkpoint directories."""

    @staticmethod
    def save(directory: Path, recipe: Recipe, model: nn.Module, optimizer, scheduler, state: dict) -> None:
        recipe.save_model(unwrap(model), directory)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "recipe": recipe.state_dict()},
            directory / "optim.pt",
        )
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    @staticmethod
    def save_rng(directory: Path, rank: int) -> None:
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, directory / f"rng_{rank}.pt")

    @staticmethod
    def load(directory: Path, recipe: Recipe, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
        recipe.load_model(unwrap(model), directory)
        optim = torch.load(directory / "optim.pt", weights_only=False)
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        recipe.load_state_dict(optim["recipe"])
        state = json.loads((directory / STATE_FILE).read_text())
        rng_file = directory / f"rng_{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
        return state


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _metrics_mean(workers: Workers, metrics: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average each metric over the micro-batches, then over the workers."""
    names = sorted(metrics[0])
    local = torch.stack([torch.stack([m[k].detach().float().cpu() for k in names]) for m in metrics]).mean(0)
    return dict(zip(names, workers.mean(local.to(workers.device)).tolist(), strict=True))


def quiet_report_lines() -> None:
    """Ray Train V2 logs "Reporting training result N: ..." at INFO for every report, repeating the console
    line this loop already prints; its logger is named by its module's file, so set that one to WARNING.
    The module is Ray's private one: where a Ray version moves it, the lines stay and training goes on."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> dict[str, list]:
    """`train_loop_per_worker` of the TorchTrainer: config = {"recipe": factory, "loop": ..., "seed": ...}.

    Returns {"history": the metrics of every logged and checkpointed step, "resumed_from": the step of
    each checkpoint the run resumed from}; both live in the checkpoints, so a resumed run returns all.
    """
    import ray.train
    import ray.train.torch

    quiet_report_lines()
    ctx = ray.train.get_context()
    loop_cfg = LoopConfig.model_validate(config["loop"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(loop_cfg.cpus_per_worker)  # the CPUs this worker reserved
    workers = Workers(ctx.get_world_rank(), ctx.get_world_size(), device)
    seed = config["seed"]
    torch.manual_seed(seed + workers.rank)
    recipe: Recipe = config["recipe"]()

    model = recipe.build_model(device)
    if workers.world_size > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=loop_cfg.lr, weight_decay=loop_cfg.weight_decay)
    plan = recipe.plan(loop_cfg, seed)
    if not plan:
        raise ValueError(f"no full optimizer step: fewer training rows than batch_size={loop_cfg.batch_size}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(len(plan), int(loop_cfg.warmup_ratio * len(plan)))
    )

    state: dict[str, Any] = {"step": 0, "bad_steps": 0, "best_eval_loss": None, "history": [], "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = Checkpointer.load(Path(directory), recipe, model, optimizer, scheduler, workers.rank)
        state["resumed_from"].append(state["step"])
        if workers.rank == 0:
            print(f"[{config['name']}] resumed from step {state['step']} of {len(plan)}", flush=True)

    writer = _tensorboard(config.get("tensorboard_dir")) if workers.rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    m = loop_cfg.micro_batch_size
    started, rows_done = time.perf_counter(), 0
    for step in range(state["step"], len(plan)):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        step_metrics, losses = [], []
        micro_batches = plan[step]
        for j, global_rows in enumerate(micro_batches):
            rows = global_rows[workers.rank * m : (workers.rank + 1) * m]
            sync = (
                contextlib.nullcontext() if j == len(micro_batches) - 1 or workers.world_size == 1 else model.no_sync()
            )
            with sync:
                with autocast:
                    loss, metrics = recipe.loss(model, rows, workers, training=True)
                (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            step_metrics.append(metrics)
        local_finite = all(torch.isfinite(x).all() for x in losses) and all(
            torch.isfinite(p.grad).all() for p in trainable if p.grad is not None
        )
        finite = workers.mean(torch.tensor(float(local_finite), device=device)).item() == 1.0
        state["bad_steps"] = count_bad_steps(finite, state["bad_steps"], loop_cfg.max_bad_steps, step + 1)
        if finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, loop_cfg.max_grad_norm))
            optimizer.step()
        else:
            grad_norm = float("nan")
            if workers.rank == 0:
                print(f"[{config['name']}] step {step + 1}: non-finite loss or gradient, skipped", flush=True)
        scheduler.step()
        state["step"] = step + 1
        rows_done += sum(len(b) for b in micro_batches)
        metrics = _metrics_mean(workers, step_metrics)
        metrics.update(
            step=state["step"],
            epoch=state["step"] / len(plan) * loop_cfg.epochs,
            learning_rate=scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            rows_per_second=rows_done / (time.perf_counter() - started),
        )
        last = state["step"] == len(plan)
        if writer is not None:
            for name, value in metrics.items():
                if name != "step" and math.isfinite(value):
                    writer.add_scalar(name, value, state["step"])
        checkpointing = state["step"] % loop_cfg.checkpoint_every == 0 or last
        if checkpointing and recipe.num_eval:
            metrics["eval_loss"] = evaluate(recipe, model, workers, m)
            best = state["best_eval_loss"]
            state["best_eval_loss"] = metrics["eval_loss"] if best is None else min(best, metrics["eval_loss"])
        logging_step = state["step"] % loop_cfg.log_every == 0 or state["step"] == 1
        if checkpointing or logging_step:
            state["history"].append(metrics)
            if workers.rank == 0:
                print(_console_line(config["name"], state["step"], len(plan), metrics), flush=True)
        if checkpointing:
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp)
                if workers.rank == 0:
                    Checkpointer.save(directory, recipe, model, optimizer, scheduler, state)
                Checkpointer.save_rng(directory, workers.rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif logging_step:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()
    return {"history": state["history"], "resumed_from": state["resumed_from"]}


@torch.no_grad()
def evaluate(recipe: Recipe, model: nn.Module, workers: Workers, micro_batch_size: int) -> float:
    """Mean loss over the eval split; rows are dealt to workers round-robin, the total all-reduced."""
    model.eval()
    rows = list(range(workers.rank, recipe.num_eval, workers.world_size))
    total = torch.zeros(2, device=workers.device)
    for start in range(0, len(rows), micro_batch_size):
        part = rows[start : start + micro_batch_size]
        loss, _ = recipe.loss(model, part, Workers(0, 1, workers.device), training=False)
        total += torch.stack([loss.float() * len(part), torch.tensor(float(len(part)), device=workers.device)])
    if workers.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def _console_line(name: str, step: int, total: int, metrics: dict[str, float]) -> str:
    shown = ["loss", "eval_loss", "rewards/accuracies", "rewards/margins", "beta", "filter/kept_fraction"]
    parts = [f"{k}={metrics[k]:.4g}" for k in shown if k in metrics]
    parts += [f"lr={metrics['learning_rate']:.2e}", f"{metrics['rows_per_second']:.1f} rows/s"]
    return f"[{name}] step {step}/{total} " + " ".join(parts)


def _tensorboard(directory: str | None):
    if not directory:
        return None
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(directory, exist_ok=True)
    return SummaryWriter(directory)


def checkpoint_name(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    """The Ray Train run name of a stage: the same config and inputs resume the same checkpoints."""
    identity = json.dumps({"config": config_hash, "inputs": inputs}, sort_keys=True).encode()
    return f"{stage}-{hashlib.sha256(identity).hexdigest()[:12]}"


def fit(
    name: str,
    recipe_factory: Callable[[], Recipe],
    loop_cfg: LoopConfig,
    seed: int,
    storage: str,
    has_eval: bool,
    tensorboard_dir: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """Run `train_loop` on a TorchTrainer; the run `name` under `storage` is where a rerun resumes from.

    Keeps the best two checkpoints by eval loss (the latest two without an eval split). `callbacks` are Ray
    Train `UserCallback`s for the run, passed down by the stage from its `StageContext` (a `raybpo tune` trial's
    `TrainToTune`, as in Ray's Train-inside-Tune example); none by default.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 polls workers every 2 s by default and each report waits for a poll; and it prints
    # every worker print twice. Both are Ray defaults worth changing for step-level training.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "name": name,
            "recipe": recipe_factory,
            "loop": loop_cfg.model_dump(mode="json", include=set(LoopConfig.model_fields)),
            "seed": seed,
            "tensorboard_dir": tensorboard_dir,
        },
        scaling_config=ScalingConfig(
            num_workers=loop_cfg.num_workers,
            use_gpu=loop_cfg.use_gpu,
            resources_per_worker={"CPU": loop_cfg.cpus_per_worker, **({"GPU": 1} if loop_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=loop_cfg.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="eval_loss" if has_eval else "step",
                checkpoint_score_order="min" if has_eval else "max",
            ),
        ),
    )
    return trainer.fit()


def best_checkpoint(result, has_eval: bool) -> Path:
    """The local folder of the run's best checkpoint by eval loss (the last one without an eval split)."""
    checkpoint = result.get_best_checkpoint(metric="eval_loss", mode="min") if has_eval else result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {result.path} reported no checkpoint")
    return Path(checkpoint.to_directory())


def load_trained(factory: Callable[[], Recipe], result, has_eval: bool) -> tuple[Recipe, nn.Module]:
    """A fresh recipe and its model on CPU with the run's best checkpoint loaded: what a stage exports."""
    recipe = factory()
    model = recipe.build_model(torch.device("cpu"))
    recipe.load_model(model, best_checkpoint(result, has_eval))
    return recipe, model


def metrics_jsonl(result) -> tuple[list[dict[str, Any]], bytes]:
    """The run's metric history (logged and checkpointed steps), and the same as JSON lines."""
    rows = result.return_value["history"]
    return rows, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
