"""The training loop's checkpoints, and the Ray Train run name each stage's checkpoints live under.

A checkpoint holds the trainable weights (safetensors), the optimizer, scheduler and recipe state
(beta-DPO's M0 and sigma, MORE's momentum) in `optim.pt`, the loop state (step, the guard's count,
the metric history) in `trainer_state.json`, and every worker's RNG state. The `.pt` files hold tensors and plain
data only and are loaded with `weights_only=True`, so write access to the checkpoint storage is not code execution
on the training workers.
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
        """This worker's torch and NumPy RNG states, as tensors and numbers (NumPy's key array as an int64 tensor)."""
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        numpy_state = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
        torch.save({"torch": torch.get_rng_state(), "numpy": numpy_state}, directory / f"rng_{rank}.pt")

    @staticmethod
    def load(directory: Path, recipe: CheckpointedRecipe, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
        """Restore a checkpoint written by `save` and `save_rng`. Its `.pt` files are read with `weights_only=True`:
        tensors, numbers, strings and containers only, so a tampered checkpoint raises instead of running code."""
        recipe.load_model(model, directory)
        optim = torch.load(directory / "optim.pt", weights_only=True)
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        recipe.load_state_dict(optim["recipe"])
        state = json.loads((directory / STATE_FILE).read_text())
        rng_file = directory / f"rng_{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            numpy_state = rng["numpy"]
            np.random.set_state(
                (
                    numpy_state["name"],
                    numpy_state["keys"].numpy().astype(np.uint32),
                    numpy_state["pos"],
                    numpy_state["has_gauss"],
                    numpy_state["cached_gaussian"],
                )
            )
        return state


def checkpoint_name(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    """The Ray Train run name of a stage: the same config and inputs resume the same checkpoints."""
    identity = json.dumps({"config": config_hash, "inputs": inputs}, sort_keys=True).encode()
    return f"{stage}-{hashlib.sha256(identity).hexdigest()[:12]}"
