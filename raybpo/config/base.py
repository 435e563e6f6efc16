"""What every config section shares: the strict base model, the error, dotted keys, actor-pool sizes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _pool_size(value: int | tuple[int, int]) -> int | tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) else value
    if not 1 <= low <= high:
        raise ValueError(f"an actor pool is N actors (N >= 1) or [MIN, MAX] with 1 <= MIN <= MAX, got {value}")
    return value


#: A Ray Data actor pool's size: N actors, or [MIN, MAX] to autoscale between them (`raybpo.cluster.actor_pool`).
PoolSize = Annotated[int | tuple[int, int], AfterValidator(_pool_size)]
POOL_HELP = "actors: N, or [MIN, MAX] to autoscale between them as work queues up (the cluster grows with it)"


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"train": {"alpha": 0}} -> {"train.alpha": 0}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dotted(value: Any) -> Any:
    """`{train: {alpha: 0}}` (what a dotted command-line override builds) is `{train.alpha: 0}`."""
    return flatten_keys(value) if isinstance(value, dict) else value
