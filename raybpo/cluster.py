"""Connecting to Ray: the one place that calls `ray.init`."""

from __future__ import annotations

import logging
import os

import ray

from raybpo.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address`, the job's cluster (RAY_ADDRESS, set by `ray job submit`), or start a local Ray."""
    if ray.is_initialized():
        return
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
    log.info("Ray resources: %s", ray.cluster_resources())
