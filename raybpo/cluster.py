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
        # The dashboard (on loopback only) serves the State API that Ray Train's placement-group cleaner polls;
        # without it the cleaner logs "Failed to query Ray Train Controller actor state" every second.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("Ray resources: %s", ray.cluster_resources())
