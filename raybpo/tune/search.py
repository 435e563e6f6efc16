"""`raybpo tune`'s search space: checked against the config and the stage graph, then the trials' settings."""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from raybpo.artifacts import EVALUATE, TRAIN
from raybpo.config import Config, ConfigError, with_overrides
from raybpo.graph import plan
from raybpo.train.dpo import FINAL_METRICS

EVALUATE_METRICS = ("win_rate", "ci_low", "ci_high")
NOT_SEARCHABLE = ("run_dir", "stages", "ray", "tune")
SEARCH_SPACE = "tune.search_space"  # names the overrides in errors


def check_search(cfg: Config) -> str:
    """Check the search space and the metrics before anything runs; returns the first stage a searched key reads."""
    space = cfg.tune.search_space
    if not space:
        raise ConfigError(
            "tune.search_space is empty: give dotted keys and values, e.g. tune.search_space.train.beta0=[0.05,0.2]"
        )
    steps = plan(cfg)
    planned = [step.name for step in steps]
    firsts = []
    for key, values in space.items():
        section = key.split(".", 1)[0]
        if section in NOT_SEARCHABLE:
            raise ConfigError(f"tune.search_space.{key}: run_dir, stages, ray.* and tune.* are fixed for a sweep")
        seen = [json.dumps(value, sort_keys=True) for value in values]
        if len(set(seen)) < len(seen):
            raise ConfigError(f"tune.search_space.{key}: a value is listed twice in {values}")
        for value in values:
            with_overrides(cfg, {key: value}, SEARCH_SPACE)
        readers = [step.name for step in steps if step.reads_key(key)]
        if not readers:
            raise ConfigError(
                f"tune.search_space.{key}: none of the config's stages ({', '.join(planned)}) reads {section}.*"
            )
        firsts.append(readers[0])
    metrics = {**dict.fromkeys(EVALUATE_METRICS, EVALUATE), **dict.fromkeys(FINAL_METRICS, TRAIN)}
    if cfg.tune.metric not in metrics:
        raise ConfigError(f"tune.metric {cfg.tune.metric!r} is not a final metric; choose one of {', '.join(metrics)}")
    if metrics[cfg.tune.metric] not in planned:
        raise ConfigError(f"tune.metric {cfg.tune.metric}: the {metrics[cfg.tune.metric]} stage is not in the stages")
    early = cfg.tune.early_stop_metric
    if early is not None and early not in FINAL_METRICS:
        raise ConfigError(f"tune.early_stop_metric {early!r} is not a train metric; choose one of {FINAL_METRICS}")
    return min(firsts, key=planned.index)


def trial_overrides(cfg: Config) -> list[dict[str, Any]]:
    """Every trial's settings (dotted key -> value) in order: the whole grid, or `num_samples` seeded draws."""
    keys, lists = list(cfg.tune.search_space), list(cfg.tune.search_space.values())
    total = math.prod(len(values) for values in lists)
    indices: range | list[int] = range(total)
    if cfg.tune.search == "random":
        if cfg.tune.num_samples > total:
            raise ConfigError(f"tune.num_samples={cfg.tune.num_samples} exceeds the {total} combinations: use a grid")
        indices = random.Random(cfg.seed).sample(range(total), cfg.tune.num_samples)
    trials = []
    for index in indices:
        chosen = {}
        for key, values in reversed(list(zip(keys, lists, strict=True))):
            index, position = divmod(index, len(values))
            chosen[key] = values[position]
        trials.append({key: chosen[key] for key in keys})
    return trials


def trial_name(overrides: dict[str, Any]) -> str:
    """A trial's folder name, a function of its settings: `trial-` and 10 hex digits."""
    return "trial-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def trial_folder(trial: Any) -> str:
    """A Tune trial's name and folder: `trial_name` of its settings."""
    return trial_name(trial.config["overrides"])


def describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in overrides.items())
