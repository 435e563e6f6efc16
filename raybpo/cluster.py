"""Connecting to Ray: the one place that calls `ray.init`; Ray Data actor pools of a configured size, and how a
table is cut into blocks for one."""

from __future__ import annotations

import logging
import os
import threading

import pyarrow as pa
import ray

from raybpo.config import PoolSize, RayConfig

log = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4
_STARTING = threading.Lock()


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address`, the job's cluster (RAY_ADDRESS, set by `ray job submit`), or start a local Ray; once,
    whichever of the stages that start at once (raybpo/pipeline.py) calls first."""
    with _STARTING:
        if not ray.is_initialized():
            _start_or_join(cfg)


def _start_or_join(cfg: RayConfig) -> None:
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address)
    else:
        # The dashboard (on loopback only) serves the State API that Ray Train's placement-group cleaner polls;
        # without it the cleaner logs "Failed to query Ray Train Controller actor state" every second.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    log.info("Ray resources: %s", ray.cluster_resources())


def actor_pool(size: PoolSize) -> ray.data.ActorPoolStrategy:
    """Ray Data's actor pool of a configured size: N actors, or from MIN up to MAX, which Ray Data adds while work
    queues up (and the autoscaler adds nodes for, when the pool asks for more than the cluster has)."""
    if isinstance(size, int):
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])


def max_actors(size: PoolSize) -> int:
    return size if isinstance(size, int) else size[1]


def actor_blocks(table: pa.Table, batch_size: int, concurrency: PoolSize) -> list[pa.Table]:
    """`table` cut into blocks of whole batches of `batch_size` rows, about BLOCKS_PER_ACTOR blocks for every actor
    the pool of `concurrency` may have, so every actor gets work and a slow block holds up little."""
    batches = -(-table.num_rows // batch_size)
    rows = batch_size * max(1, -(-batches // (max_actors(concurrency) * BLOCKS_PER_ACTOR)))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
