"""What every config section shares: the strict base model, the error, dotted keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
