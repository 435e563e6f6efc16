"""What a training stage plugs into the loop (`raybpo.train.loop`): a `Recipe` (the model, the examples, the
loss of a micro-batch, the saved files), the `Workers` it runs on, and the default data plan, `step_plan`: a pure
function of (seed, epoch), length-bucketed GLOBAL micro-batches of `micro_batch_size * num_workers` rows, worker r
taking slice r of each, so any worker count sees the same global batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raybpo.config import LoopConfig
from raybpo.models.logps import length_bucketed_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    #: the tokenizer of the model `build_model` built: saved beside every exported model folder
    tokenizer: PreTrainedTokenizerBase | None = None

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

    def counts(self) -> dict[str, int]:
        """The row counts the stage's manifest records: the evaluation split's (a recipe may add its own)."""
        return {"eval": self.num_eval}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def step_plan(lengths: np.ndarray, cfg: LoopConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step's global micro-batches (row indices), for all epochs."""
    per_micro = cfg.micro_batch_size * cfg.num_workers
    accumulation = cfg.batch_size // per_micro
    steps = []
    for epoch in range(cfg.epochs):
        micro = length_bucketed_batches(lengths, per_micro, seed, epoch)
        steps += [micro[i : i + accumulation] for i in range(0, len(micro) - accumulation + 1, accumulation)]
    return steps
