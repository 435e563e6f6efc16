"""BPO breadth (docs/ALGORITHMS.md 3.1): fewer, representative prompts, as pure functions.

- Deduplication: prompts are identified by `raybpo.data.schema.prompt_key` (sha256 of the lower-cased text
  with whitespace collapsed). A prompt keeps the text of its smallest pair_id and lists all its pair ids.
- Embedding text: a chat prompt (JSON messages) is embedded as the text of its last user message.
- Clustering: K_b = `breadth.num_clusters`, else round_half_up(n / `breadth.prompts_per_cluster`), within [1, n];
  spherical k-means and assignment by cosine similarity (`raybpo.selection.clustering`).
- **raybpo rule** (ranking): within each cluster, prompts are ranked by cosine similarity to the centroid,
  descending, ties broken by `prompt_key` ascending (rank 0 = closest). A cluster of `size` prompts keeps its
  top `keep_count(size, eta) = max(1, round_half_up(eta * size))`: the count nearest to the share eta (a half
  rounds up), and at least one per non-empty cluster, so a 5-prompt cluster keeps 1 at eta = 0.1, a 15-prompt
  cluster 2 and a 25-prompt cluster 3.
- Baselines (`breadth.method`): `random` keeps as many prompts as `cluster` would, drawn uniformly with the
  seed; `all` keeps every prompt. Both still cluster, so every output has the same columns and `random` can
  match the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raybpo.config import BreadthConfig
from raybpo.data.schema import prompt_key, prompt_messages
from raybpo.selection.clustering import (
    assign_to_centroids,
    keep_count,
    num_clusters,
    rank_within_clusters,
    select_random,
    spherical_kmeans,
)


@dataclass
class DistinctPrompts:
    """Distinct prompts sorted by key: the text of each key's first pair (by pair_id) and all its pair ids."""

    keys: list[str]
    prompts: list[str]
    pair_ids: list[list[str]]

    @property
    def pairs(self) -> list[int]:
        return [len(ids) for ids in self.pair_ids]


def dedup_prompts(pair_ids: list[str], prompts: list[str]) -> DistinctPrompts:
    """BPO 3.1 deduplication: group pairs by `prompt_key`; each group keeps the text of its smallest pair_id."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for pair_id, prompt in sorted(zip(pair_ids, prompts, strict=True)):
        key = prompt_key(prompt)
        if key in groups:
            groups[key][1].append(pair_id)
        else:
            groups[key] = (prompt, [pair_id])
    keys = sorted(groups)
    return DistinctPrompts(keys, [groups[k][0] for k in keys], [groups[k][1] for k in keys])


def embedding_text(prompt: str) -> str:
    """The text embedded for a prompt: plain text as is; chat JSON as its last user message's content."""
    messages = prompt_messages(prompt)
    if messages is None:
        return prompt
    user = [m["content"] for m in messages if m["role"] == "user"]
    return str(user[-1]) if user else "\n".join(str(m["content"]) for m in messages)


def num_clusters_for(n: int, cfg: BreadthConfig) -> int:
    """K_b: `num_clusters`, else about `prompts_per_cluster` prompts per cluster; within [1, n] (n > 0)."""
    return num_clusters(n, cfg.num_clusters, cfg.prompts_per_cluster)


def select_cluster(cluster: np.ndarray, rank: np.ndarray, eta: float, k: int) -> np.ndarray:
    """The `cluster` method (BPO 3.1 ranking rule): keep the prompts ranked below their cluster's `keep_count`."""
    sizes = np.bincount(cluster, minlength=k)
    return rank < keep_count(sizes, eta)[cluster]


def select_prompts(method: str, cluster: np.ndarray, rank: np.ndarray, eta: float, k: int, seed: int) -> np.ndarray:
    """The kept mask of a method: `cluster` (the ranking rule), `random` (same count, uniform) or `all`."""
    by_rule = select_cluster(cluster, rank, eta, k)
    if method == "cluster":
        return by_rule
    if method == "random":
        return select_random(len(cluster), int(by_rule.sum()), seed)
    if method == "all":
        return np.ones(len(cluster), dtype=bool)
    raise ValueError(f"unknown breadth method {method!r}; expected cluster, random or all")


@dataclass
class Selection:
    num_clusters: int
    cluster: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray
    kept: np.ndarray
    objective: float


def cluster_and_select(
    embeddings: np.ndarray, keys: list[str], cfg: BreadthConfig, seed: int, use_gpu: bool = False
) -> Selection:
    """BPO 3.1 on unit embeddings: K_b, spherical k-means, assignment, ranking and the method's selection."""
    k = num_clusters_for(len(keys), cfg)
    centroids, objective = spherical_kmeans(embeddings, k, seed, use_gpu=use_gpu)
    cluster, similarity = assign_to_centroids(embeddings, centroids)
    rank = rank_within_clusters(cluster, similarity, keys)
    kept = select_prompts(cfg.method, cluster, rank, cfg.eta, k, seed)
    return Selection(k, cluster, similarity, rank, kept, objective)
