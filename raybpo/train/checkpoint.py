"""The training loop's checkpoints, and the Ray Train run name each stage's checkpoints live under.

A checkpoint holds the trainable weights (safetensors), the optimizer, scheduler and recipe state
(beta-DPO's M0 and sigma, MORE's momentum) in `optim.pt`, the loop state (step, the guard's count,
the metric history) in `trainer_state.json`, and every worker's RNG state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

STATE_FILE = "trainer_state.json"


class CheckpointedRecipe(Protocol):
    """What a checkpoint needs of the loop's recipe (`train.recipe.Recipe`): its model files and its state."""

    def save_model(self, model: nn.Module, directory: Path) -> None: ...
    def load_model(self, model: nn.Module, directory: Path) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Write and read the loop's checkpoint directories (`model` unwrapped from DDP)."""

    @staticmethod
    def save(directory: Path, recipe: CheckpointedRecipe, model: nn.Module, optimizer, scheduler, state: dict) -> None:
        recipe.save_model(model, directory)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "recipe": recipe.state_dict()},
            directory / "optim.pt",
        )
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    @staticmethod
    def save_rng(directory: Path, rank: int) -> None:
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, directory / f"rng_{rank}.pt")

    @staticmethod
    def load(directory: Path, recipe: CheckpointedRecipe, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
        recipe.load_model(model, directory)
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


def checkpoint_name(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    """The Ray Train run name of a stage: the same config and inputs resume the same checkpoints."""
    identity = json.dumps({"config": config_hash, "inputs": inputs}, sort_keys=True).encode()
    return f"{stage}-{hashlib.sha256(identity).hexdigest()[:12]}"
