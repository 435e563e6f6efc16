"""The data-parallel training loop on Ray Train, shared by SFT, DPO and reward models.

A `Recipe` (`raybpo.train.recipe`) supplies the model, the examples and the loss of a micro-batch; this loop
supplies what every stage needs: DDP (gloo on CPU, NCCL on GPU), gradient accumulation, AdamW with warm-up and
cosine decay, gradient clipping, bf16 autocast on GPU, a non-finite-loss guard, evaluation, checkpoints through
`ray.train.report`, resume, metrics on the console and in TensorBoard.

Spot preemption: after every optimizer step all workers ask `ray.train.get_preemption_info()` (one collective);
once Ray says a node of the group is being reclaimed, the loop saves a just-in-time checkpoint and trains on,
and Ray Train restarts the group from it when the node is gone (`max_preemption_failures` times, counted apart
from `max_failures`).

Exact multi-worker behaviour. The data plan (`step_plan`, the recipe's default) is a pure function of (seed,
epoch): length-bucketed GLOBAL micro-batches of `micro_batch_size * num_workers` rows, `batch_size / that` of
them per optimizer step; worker r takes slice r of each. One worker with micro-batch `m * W` therefore sees
exactly the batches W workers with micro-batch `m` see together. The plan position is the step number, so a
resumed run continues with the very next batch. What a checkpoint holds: `raybpo.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raybpo.config import LoopConfig
from raybpo.rundir import RunDir
from raybpo.train.checkpoint import Checkpointer
from raybpo.train.recipe import Recipe, Workers

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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


@dataclass(frozen=True)
class Optimization:
    """The model being trained, its trainable parameters, AdamW and the warm-up/cosine schedule over the plan."""

    model: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def build(cls, model: nn.Module, cfg: LoopConfig, total_steps: int) -> Optimization:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, int(cfg.warmup_ratio * total_steps))
        )
        return cls(model, trainable, optimizer, scheduler)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step's outcome: every worker's loss and gradients finite, the clipped norm, the metrics."""

    finite: bool
    grad_norm: float
    metrics: list[dict[str, torch.Tensor]]


def optimizer_step(
    recipe: Recipe,
    opt: Optimization,
    micro_batches: list[list[int]],
    workers: Workers,
    cfg: LoopConfig,
) -> StepOutcome:
    """One optimizer step: this worker's slice of each global micro-batch (bf16 autocast on GPU), gradients
    accumulated (DDP syncs on the last), the finite check agreed by every worker, clipping and AdamW, the schedule.
    A step that is not finite is skipped: no AdamW update, and the recipe's state (beta-DPO's M0, sigma and step
    count, MORE's momentum) put back as it was before the step, so the batch leaves no trace but the schedule."""
    model, m = opt.model, cfg.micro_batch_size
    state_before = copy.deepcopy(recipe.state_dict())
    cuda = workers.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    model.train()
    opt.optimizer.zero_grad(set_to_none=True)
    step_metrics, losses = [], []
    for j, global_rows in enumerate(micro_batches):
        rows = global_rows[workers.rank * m : (workers.rank + 1) * m]
        sync = contextlib.nullcontext() if j == len(micro_batches) - 1 or workers.world_size == 1 else model.no_sync()
        with sync:
            with autocast:
                loss, metrics = recipe.loss(model, rows, workers, training=True)
            (loss / len(micro_batches)).backward()
        losses.append(loss.detach())
        step_metrics.append(metrics)
    local_finite = all(torch.isfinite(x).all() for x in losses) and all(
        torch.isfinite(p.grad).all() for p in opt.trainable if p.grad is not None
    )
    finite = workers.mean(torch.tensor(float(local_finite), device=workers.device)).item() == 1.0
    grad_norm = float("nan")
    if finite:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.trainable, cfg.max_grad_norm))
        opt.optimizer.step()
    else:
        recipe.load_state_dict(state_before)
    opt.scheduler.step()
    return StepOutcome(finite, grad_norm, step_metrics)


class TensorBoard:
    """Rank 0's TensorBoard event files in the run-directory folder `uri`: written there when it is local, else
    into a folder on this node that is uploaded before every checkpoint is reported and at the end (event files are
    named by host, process and time, so a group resumed from a checkpoint adds its own beside the earlier ones,
    which hold every step up to that checkpoint)."""

    def __init__(self, uri: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.target = RunDir(uri)
        self.folder = self.target.root if self.target.is_local() else tempfile.mkdtemp(prefix="raybpo-tensorboard-")
        os.makedirs(self.folder, exist_ok=True)
        self.writer = SummaryWriter(self.folder)

    def add(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if name != "step" and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def sync(self) -> None:
        self.writer.flush()
        if not self.target.is_local():
            self.target.upload_dir(self.folder)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if not self.target.is_local():
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class WorkerRun:
    """One worker's training run: its recipe, optimizer and plan, the loop state, TensorBoard on rank 0, and
    whether this attempt already saved its just-in-time checkpoint for a preemption."""

    name: str
    cfg: LoopConfig
    workers: Workers
    recipe: Recipe
    opt: Optimization
    plan: list[list[list[int]]]
    state: dict[str, Any]
    tensorboard: TensorBoard | None = None
    saved_for_preemption: bool = False

    @classmethod
    def start(cls, config: dict[str, Any]) -> WorkerRun:
        """Set up this worker (threads, seed, the recipe's model, DDP, AdamW), resumed from the run's checkpoint."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        cfg = LoopConfig.model_validate(config["loop"])
        device = ray.train.torch.get_device()
        if device.type == "cpu":
            torch.set_num_threads(cfg.cpus_per_worker)  # the CPUs this worker reserved
        workers = Workers(ctx.get_world_rank(), ctx.get_world_size(), device)
        seed = config["seed"]
        torch.manual_seed(seed + workers.rank)
        recipe: Recipe = config["recipe"]()
        model = recipe.build_model(device)
        if workers.world_size > 1:
            model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")
        plan = recipe.plan(cfg, seed)
        if not plan:
            raise ValueError(f"no full optimizer step: fewer training rows than batch_size={cfg.batch_size}")
        state = {
            "step": 0,
            "bad_steps": 0,
            "best_eval_loss": None,
            "history": [],
            "resumed_from": [],
            "preemption_checkpoints": [],
        }
        run = cls(config["name"], cfg, workers, recipe, Optimization.build(model, cfg, len(plan)), plan, state)
        run.resume(ray.train.get_checkpoint())
        if workers.rank == 0 and config.get("tensorboard"):
            run.tensorboard = TensorBoard(config["tensorboard"])
        return run

    def resume(self, checkpoint) -> None:
        """Load the weights, optimizer, recipe and loop state of `checkpoint` (the run's latest), if any."""
        if checkpoint is None:
            return
        opt = self.opt
        with checkpoint.as_directory() as directory:
            self.state = Checkpointer.load(
                Path(directory), self.recipe, unwrap(opt.model), opt.optimizer, opt.scheduler, self.workers.rank
            )
        self.state.setdefault("preemption_checkpoints", [])  # absent in checkpoints of raybpo before 0.2
        self.state["resumed_from"].append(self.state["step"])
        self.announce(f"resumed from step {self.state['step']} of {len(self.plan)}")

    def announce(self, message: str) -> None:
        if self.workers.rank == 0:
            print(f"[{self.name}] {message}", flush=True)

    def step_metrics(self, outcome: StepOutcome, rows_done: int, started: float) -> dict[str, float]:
        """The metrics of the step just taken: the recipe's, averaged, and the loop's (rows/s since `started`)."""
        metrics = _metrics_mean(self.workers, outcome.metrics)
        metrics.update(
            step=self.state["step"],
            epoch=self.state["step"] / len(self.plan) * self.cfg.epochs,
            learning_rate=self.opt.scheduler.get_last_lr()[0],
            grad_norm=outcome.grad_norm,
            rows_per_second=rows_done / (time.perf_counter() - started),
        )
        return metrics

    def record(self, metrics: dict[str, float]) -> None:
        """TensorBoard; at a checkpoint step the eval loss and a checkpoint; the history, console and Ray report."""
        import ray.train

        step, cfg = self.state["step"], self.cfg
        if self.tensorboard is not None:
            self.tensorboard.add(metrics, step)
        checkpointing = step % cfg.checkpoint_every == 0 or step == len(self.plan)
        if checkpointing and self.recipe.num_eval:
            metrics["eval_loss"] = evaluate(self.recipe, self.opt.model, self.workers, cfg.micro_batch_size)
            best = self.state["best_eval_loss"]
            self.state["best_eval_loss"] = metrics["eval_loss"] if best is None else min(best, metrics["eval_loss"])
        logging_step = step % cfg.log_every == 0 or step == 1
        if checkpointing or logging_step:
            self.state["history"].append(metrics)
            if self.workers.rank == 0:
                print(_console_line(self.name, step, len(self.plan), metrics), flush=True)
        if checkpointing:
            self.checkpoint(metrics)
        elif logging_step:
            ray.train.report(metrics)

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Report `metrics` with a checkpoint of this worker's state (weights and optimizer from rank 0)."""
        import ray.train

        if self.tensorboard is not None:  # first: a run resumed from this checkpoint finds its events stored
            self.tensorboard.sync()
        with tempfile.TemporaryDirectory() as tmp:
            directory, opt = Path(tmp), self.opt
            if self.workers.rank == 0:
                Checkpointer.save(directory, self.recipe, unwrap(opt.model), opt.optimizer, opt.scheduler, self.state)
            Checkpointer.save_rng(directory, self.workers.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def checkpoint_if_preempted(self, metrics: dict[str, float]) -> None:
        """The just-in-time checkpoint: once Ray reports that a node of this group is being preempted (every
        worker asks, one collective per step), checkpoint now, once per attempt, and train on. Its eval loss is
        NaN (not evaluated, to fit the reclaim notice), so it is never the best checkpoint, only the latest."""
        import ray.train

        if self.saved_for_preemption or self.state["step"] == len(self.plan):
            return
        notice = ray.train.get_preemption_info()
        if notice is None:
            return
        self.saved_for_preemption = True
        self.state["preemption_checkpoints"].append(self.state["step"])
        self.announce(
            f"node(s) {', '.join(notice.preempted_node_ids)} being preempted: checkpoint at step {self.state['step']}"
        )
        self.checkpoint({**metrics, "eval_loss": float("nan")} if self.recipe.num_eval else metrics)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` of the TorchTrainer: config = {"recipe": factory, "loop": ..., "seed": ...}.

    Returns {"history": the metrics of every logged and checkpointed step, "resumed_from": the step of
    each checkpoint the run resumed from, "preemption_checkpoints": the steps of its just-in-time checkpoints};
    all live in the checkpoints, so a resumed run returns all; and "stopped": None, or the NaN/inf guard's message
    when it stopped the run. That stop is a result rather than a worker failure: every worker stops at the same
    step (the finite check is agreed by all), a Ray Train restart from the last checkpoint would only replay the
    same steps, and `fit` raises it.
    """
    quiet_report_lines()
    run = WorkerRun.start(config)
    state = run.state
    started, rows_done = time.perf_counter(), 0
    stopped = None
    try:
        for step in range(state["step"], len(run.plan)):
            outcome = optimizer_step(run.recipe, run.opt, run.plan[step], run.workers, run.cfg)
            state["bad_steps"] = count_bad_steps(outcome.finite, state["bad_steps"], run.cfg.max_bad_steps, step + 1)
            if not outcome.finite:
                run.announce(f"step {step + 1}: non-finite loss or gradient, skipped")
            state["step"] = step + 1
            rows_done += sum(len(b) for b in run.plan[step])
            metrics = run.step_metrics(outcome, rows_done, started)
            run.record(metrics)
            run.checkpoint_if_preempted(metrics)
    except NonFiniteLossError as err:
        stopped = str(err)
    if run.tensorboard is not None:
        run.tensorboard.close()
    return {key: state[key] for key in ("history", "resumed_from", "preemption_checkpoints")} | {"stopped": stopped}


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


def fit(
    name: str,
    recipe_factory: Callable[[], Recipe],
    loop_cfg: LoopConfig,
    seed: int,
    storage: str,
    has_eval: bool,
    tensorboard: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """Run `train_loop` on a TorchTrainer; the run `name` under `storage` is where a rerun resumes from, and
    rank 0 writes TensorBoard event files to the run-directory folder (URI) `tensorboard`.

    Raises `NonFiniteLossError` itself (not Ray's worker-group error, and without the retries of `max_failures`,
    which would replay the same steps) when the NaN/inf guard stops the run.

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
            "tensorboard": tensorboard,
        },
        scaling_config=ScalingConfig(
            num_workers=loop_cfg.num_workers,
            use_gpu=loop_cfg.use_gpu,
            resources_per_worker={"CPU": loop_cfg.cpus_per_worker, **({"GPU": 1} if loop_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=loop_cfg.max_failures, max_preemption_failures=loop_cfg.max_preemption_failures
            ),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="eval_loss" if has_eval else "step",
                checkpoint_score_order="min" if has_eval else "max",
            ),
        ),
    )
    result = trainer.fit()
    if result.return_value["stopped"]:
        raise NonFiniteLossError(f"{name}: {result.return_value['stopped']}")
    return result
