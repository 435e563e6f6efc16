"""BPO depth selection (docs/ALGORITHMS.md 3.3): pick response pairs from their gradient features' clusters.

- Clustering: K_g = `depth.num_clusters`, else about `depth.pairs_per_cluster` pairs per cluster; spherical
  k-means on the unit features and assignment by cosine similarity (`raybpo.selection.clustering`).
- **raybpo rule** (selection, `bpo`): in every cluster pairs are ranked by the strategy's score (`centroid`:
  cosine similarity to the centroid; `norm`: gradient norm; `boundary`: minus the similarity; `random`: a seeded
  uniform draw), ties by pair_id, and the top `keep_count(size, eta_g)` kept. Every prompt with no kept pair then
  gets its largest-gap pair (ties by pair_id). With `depth.budget`, a selection above it is cut to the budget:
  each prompt's best-scored pair first, then the rest by score, globally. A prompt's pair count is its
  allocation (dynamic depth).
- Baselines at the same budget (the number of pairs `bpo` kept): `random` (pairs drawn uniformly from every
  featured pair), `uniform` (the same number of pairs for every prompt: budget // prompts each, the remainder
  to prompts drawn at random; a prompt takes its largest-gap pairs first, and a prompt with too few pairs
  leaves its share to the others), and `original` (the ingested (n, 2) data: one pair per prompt, prompts
  drawn at random, more pairs per prompt only when the prompts run out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from raybpo.config import DepthConfig
from raybpo.plots import png_bytes, subplots
from raybpo.selection.clustering import (
    assign_to_centroids,
    keep_count,
    num_clusters,
    rank_within_clusters,
    select_random,
    spherical_kmeans,
)

SELECTIONS = ("bpo", "random", "uniform", "original")
# numpy streams [seed, stream] after raybpo.selection.clustering's 0 (init) and 1 (random)
UNIFORM_STREAM, ORIGINAL_STREAM, STRATEGY_STREAM, WARMUP_STREAM = 2, 3, 4, 5


class DepthError(RuntimeError):
    """The depth stage cannot select: no pairs, or a budget below the number of prompts."""


@dataclass
class PairClusters:
    num_clusters: int
    cluster: np.ndarray
    similarity: np.ndarray
    objective: float


def cluster_pairs(features: np.ndarray, cfg: DepthConfig, seed: int, use_gpu: bool = False) -> PairClusters:
    """BPO 3.3 on unit gradient features: K_g, spherical k-means and every pair's cluster and similarity."""
    k = num_clusters(len(features), cfg.num_clusters, cfg.pairs_per_cluster)
    centroids, objective = spherical_kmeans(features, k, seed, use_gpu=use_gpu)
    cluster, similarity = assign_to_centroids(features, centroids)
    return PairClusters(k, cluster, similarity, objective)


def strategy_score(strategy: str, similarity: np.ndarray, grad_norm: np.ndarray, seed: int) -> np.ndarray:
    """Higher is better: `centroid` similarity, `norm` gradient norm, `boundary` -similarity, `random` a draw."""
    if strategy == "centroid":
        return np.asarray(similarity, dtype=np.float64)
    if strategy == "norm":
        return np.asarray(grad_norm, dtype=np.float64)
    if strategy == "boundary":
        return -np.asarray(similarity, dtype=np.float64)
    if strategy == "random":
        return np.random.default_rng([seed, STRATEGY_STREAM]).random(len(similarity))
    raise ValueError(f"unknown depth strategy {strategy!r}; expected centroid, norm, boundary or random")


def _best_per_group(groups: np.ndarray, score: np.ndarray, ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices (among `candidates`) of the highest-score row of every group, ties by smallest id."""
    order = candidates[np.lexsort((ids[candidates], -score[candidates], groups[candidates]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return order[first]


def select_bpo(
    cluster: np.ndarray,
    score: np.ndarray,
    pair_ids: np.ndarray,
    prompt_keys: np.ndarray,
    gaps: np.ndarray,
    eta: float,
    k: int,
    budget: int | None = None,
) -> np.ndarray:
    """The BPO 3.3 selection rule of the module docstring: top eta per cluster, a pair for every prompt, budget."""
    pair_ids, prompt_keys = np.asarray(pair_ids, dtype=str), np.asarray(prompt_keys, dtype=str)
    _, prompt = np.unique(prompt_keys, return_inverse=True)
    rank = rank_within_clusters(cluster, score, pair_ids)
    kept = rank < keep_count(np.bincount(cluster, minlength=k), eta)[cluster]
    missing = ~np.isin(prompt, prompt[kept])
    kept[_best_per_group(prompt, np.asarray(gaps, dtype=np.float64), pair_ids, np.flatnonzero(missing))] = True
    if budget is None or kept.sum() <= budget:
        return kept
    prompts = len(np.unique(prompt))
    if budget < prompts:
        raise DepthError(f"depth.budget={budget} is below the {prompts} prompts, each of which keeps a pair")
    guaranteed = _best_per_group(prompt, score, pair_ids, np.flatnonzero(kept))
    rest = np.setdiff1d(np.flatnonzero(kept), guaranteed)
    rest = rest[np.lexsort((pair_ids[rest], -score[rest]))][: budget - len(guaranteed)]
    out = np.zeros(len(kept), dtype=bool)
    out[guaranteed] = out[rest] = True
    return out


def select_uniform(prompt_keys: np.ndarray, gaps: np.ndarray, pair_ids: np.ndarray, count: int, seed: int):
    """The `uniform` baseline: the same number of pairs for every prompt (largest gaps first); module doc."""
    prompt_keys, pair_ids = np.asarray(prompt_keys, dtype=str), np.asarray(pair_ids, dtype=str)
    keys, prompt = np.unique(prompt_keys, return_inverse=True)
    order = np.lexsort((pair_ids, -np.asarray(gaps, dtype=np.float64), prompt))  # by prompt, gap descending
    members = np.split(order, np.searchsorted(prompt[order], np.arange(1, len(keys))))
    quota = np.full(len(keys), count // len(keys))
    quota[np.random.default_rng([seed, UNIFORM_STREAM]).permutation(len(keys))[: count % len(keys)]] += 1
    available = np.array([len(m) for m in members])
    while (short := np.minimum(quota, available)).sum() < min(count, available.sum()):
        spare = count - short.sum()
        room = np.flatnonzero(available > short)
        quota = short.copy()
        quota[room[: min(spare, len(room))]] += 1
    kept = np.zeros(len(prompt_keys), dtype=bool)
    for rows, take in zip(members, np.minimum(quota, available), strict=True):
        kept[rows[:take]] = True
    return kept


def select_original(prompt_keys: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The `original` baseline: `count` ingested pairs, one per prompt (seeded order) before any second one."""
    n = len(prompt_keys)
    order = np.random.default_rng([seed, ORIGINAL_STREAM]).permutation(n)
    seen: Counter[str] = Counter()
    turn = np.empty(n, dtype=np.int64)
    for i in order:
        turn[i] = seen[prompt_keys[i]]
        seen[prompt_keys[i]] += 1
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    kept = np.zeros(n, dtype=bool)
    kept[np.lexsort((position, turn))[:count]] = True
    return kept


def select_pairs(
    clusters: PairClusters,
    score: np.ndarray,
    pair_ids: np.ndarray,
    prompt_keys: np.ndarray,
    gaps: np.ndarray,
    cfg: DepthConfig,
    seed: int,
) -> dict[str, np.ndarray]:
    """The kept masks of `bpo` and of the `random` and `uniform` baselines at its budget (its number of pairs)."""
    bpo = select_bpo(clusters.cluster, score, pair_ids, prompt_keys, gaps, cfg.eta, clusters.num_clusters, cfg.budget)
    budget = int(bpo.sum())
    return {
        "bpo": bpo,
        "random": select_random(len(pair_ids), budget, seed),
        "uniform": select_uniform(prompt_keys, gaps, pair_ids, budget, seed),
    }


def allocation(prompt_keys: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Every row's prompt's number of kept pairs (its dynamic depth)."""
    counts = Counter(np.asarray(prompt_keys)[kept].tolist())
    return np.array([counts.get(k, 0) for k in prompt_keys], dtype=np.int64)


def warmup_sample(n: int, count: int, seed: int) -> np.ndarray:
    """The sorted rows of the LESS-style warm-up (ALGORITHMS.md 4): `count` of `n` pairs (at most n), seeded."""
    return np.sort(np.random.default_rng([seed, WARMUP_STREAM]).choice(n, size=min(n, count), replace=False))


def plot_pairs_per_prompt(allocations: dict[str, np.ndarray]) -> bytes:
    """PNG (BPO's Figure 4): a histogram of pairs per prompt for each selection (dynamic depth vs the baselines)."""

    fig, ax = subplots(figsize=(6, 3.5))
    top = max(int(a.max()) for a in allocations.values() if len(a))
    bins = np.arange(0.5, top + 1.5)
    for name, counts in allocations.items():
        ax.hist(counts, bins=bins, alpha=0.55, label=f"{name} ({int(counts.sum())} pairs)")
    ax.set(title="pairs per prompt", xlabel="pairs selected for the prompt", ylabel="prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
