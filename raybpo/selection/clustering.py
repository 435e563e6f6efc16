"""What breadth (prompt embeddings) and depth (gradient features) share: spherical k-means on unit vectors, the
top-eta-per-cluster rule, the `random` baseline and the counts both stages report (docs/ALGORITHMS.md 3.1, 3.3).

faiss does the Lloyd iterations (`faiss.Kmeans(spherical=True)`, every point, no subsampling) from a greedy
k-means++ init drawn with the seed; points are assigned to the centroid of largest inner product (the cosine
similarity: points and centroids are unit vectors) and ranked inside their cluster by it. A cluster of `size`
points keeps `keep_count(size, eta) = max(1, round_half_up(eta * size))`.

Seeded draws use numpy streams `[seed, stream]`: 0 the k-means++ init, 1 the `random` baseline (both stages);
raybpo.selection.depth numbers its own from 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raybpo.plots import png_bytes, subplots

KMEANS_NITER = 25
INIT_STREAM = 0  # the k-means++ init draws from (seed, INIT_STREAM)
RANDOM_STREAM = 1  # the `random` baseline draws from (seed, RANDOM_STREAM)
KEEP_RULE = "max(1, round_half_up(eta * cluster_size))"


def num_clusters(n: int, explicit: int | None, per_cluster: int) -> int:
    """K: `explicit`, else about `per_cluster` points per cluster (round half up); within [1, n] (n > 0)."""
    k = explicit if explicit is not None else int(round_half_up(n / per_cluster))
    return max(1, min(k, n))


def round_half_up(x: float | np.ndarray) -> Any:
    """Nearest integer, halves up (1e-9 absorbs float error: 0.35 * 90 = 31.499999999999996 gives 32)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + 1e-9).astype(np.int64)


def keep_count(sizes: np.ndarray | int, eta: float) -> np.ndarray:
    """raybpo rule: a cluster of `size` prompts keeps max(1, round_half_up(eta * size)); an empty one keeps 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.where(sizes > 0, np.clip(round_half_up(eta * sizes), 1, sizes), 0)


def select_random(n: int, count: int, seed: int) -> np.ndarray:
    """The `random` baseline (BPO 3.1, 3.3): `count` of `n` rows (at most n), uniform without replacement."""
    kept = np.zeros(n, dtype=bool)
    kept[np.random.default_rng([seed, RANDOM_STREAM]).choice(n, size=min(count, n), replace=False)] = True
    return kept


def kmeans_pp_init(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k initial centroids for unit rows `x`: greedy k-means++ (scikit-learn's init), seeded by (seed, INIT_STREAM).

    Each step draws 2 + floor(ln k) candidates with probability proportional to their squared distance to the
    nearest centroid so far (2 - 2 cos for unit vectors) and keeps the one that lowers the total most. Plain
    k-means++ (and faiss's random init) often puts two centroids in one well-separated group and none in
    another; the greedy draw rarely does. Cost O(n k d log k), on the driver.
    """
    rng = np.random.default_rng([seed, INIT_STREAM])
    n, trials = len(x), 2 + int(np.log(k))
    chosen = [int(rng.integers(n))]
    closest = np.maximum(2.0 - 2.0 * (x @ x[chosen[0]]), 0.0)
    for _ in range(1, k):
        total = float(closest.sum(dtype=np.float64))
        if total > 0:
            draws = rng.random(trials) * total
            candidates = np.minimum(np.searchsorted(np.cumsum(closest, dtype=np.float64), draws), n - 1)
        else:  # every point sits on a centroid already
            candidates = rng.integers(n, size=trials)
        distances = np.minimum(closest, np.maximum(2.0 - 2.0 * (x[candidates] @ x.T), 0.0))
        best = int(np.argmin(distances.sum(axis=1, dtype=np.float64)))
        chosen.append(int(candidates[best]))
        closest = distances[best]
    return x[chosen]


def spherical_kmeans(
    x: np.ndarray, k: int, seed: int, niter: int = KMEANS_NITER, use_gpu: bool = False
) -> tuple[np.ndarray, float]:
    """Unit-norm centroids (k, d) of faiss's spherical k-means on unit rows `x` (greedy k-means++ init), and the
    final objective (the sum of every point's cosine similarity to its centroid)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=bool(use_gpu),
        min_points_per_centroid=1,  # silences faiss's "please provide at least 39 points per centroid"
        max_points_per_centroid=max(256, -(-x.shape[0] // k)),  # train on every point, never a subsample
    )
    kmeans.train(x, init_centroids=kmeans_pp_init(x, k, seed))
    return normalize_rows(kmeans.centroids), float(kmeans.obj[-1]) if len(kmeans.obj) else float("nan")


def use_faiss_gpu(num_gpus: float) -> bool:
    """Whether k-means runs on a GPU: the stage's actors ask for GPUs and faiss sees one on the driver."""
    import faiss

    return num_gpus > 0 and faiss.get_num_gpus() > 0


def kmeans_record(use_gpu: bool, objective: float) -> dict[str, Any]:
    """The manifest's `kmeans` entry: backend, iterations, the final objective (None when there is none)."""
    return {
        "backend": "faiss-gpu" if use_gpu else "faiss-cpu",
        "niter": KMEANS_NITER,
        "objective": round(objective, 6) if math.isfinite(objective) else None,
    }


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine similarity) of every row: the centroid of largest inner product (exact, faiss)."""
    import faiss

    centroids = np.ascontiguousarray(normalize_rows(centroids))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    similarity, cluster = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return cluster[:, 0].astype(np.int64), similarity[:, 0].astype(np.float32)


def rank_within_clusters(cluster: np.ndarray, similarity: np.ndarray, keys: list[str] | np.ndarray) -> np.ndarray:
    """Rank of every prompt in its cluster: similarity descending, ties by key ascending; 0 = closest."""
    cluster = np.asarray(cluster, dtype=np.int64)
    order = np.lexsort((np.asarray(keys, dtype=str), -np.asarray(similarity, dtype=np.float64), cluster))
    sorted_cluster = cluster[order]
    first = np.searchsorted(sorted_cluster, sorted_cluster, side="left")
    rank = np.empty(len(cluster), dtype=np.int64)
    rank[order] = np.arange(len(cluster)) - first
    return rank


def count_stats(values: np.ndarray) -> dict[str, float]:
    """min, median, mean and max of counts (cluster sizes, pairs per prompt); {} for none."""
    if not len(values):
        return {}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 3),
        "max": int(values.max()),
    }


@dataclass
class ClusterCounts:
    """The size and the kept count of every non-empty cluster, and how many clusters came out empty."""

    sizes: np.ndarray
    kept: np.ndarray
    empty: int


def cluster_counts(cluster: np.ndarray, kept: np.ndarray, k: int) -> ClusterCounts:
    """The `ClusterCounts` of `k` clusters from every row's cluster and kept flag."""
    sizes = np.bincount(cluster, minlength=k)
    kept_per_cluster = np.bincount(cluster[kept], minlength=k)
    non_empty = sizes > 0
    return ClusterCounts(sizes[non_empty], kept_per_cluster[non_empty], int((~non_empty).sum()))


def plot_cluster_sizes(counts: ClusterCounts, eta: float, method: str, unit: str = "prompts") -> bytes:
    """PNG: a histogram of cluster sizes, and the kept count of every cluster against its size (in `unit`)."""
    sizes, kept = counts.sizes, counts.kept
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = subplots(1, 2, figsize=(9, 3.5))
    left.hist(sizes, bins=min(30, max(1, len(np.unique(sizes)))), color="tab:blue")
    left.set(title=f"{len(sizes)} clusters", xlabel=f"{unit} in cluster", ylabel="clusters")
    right.scatter(sizes, kept, s=12, alpha=0.6, label=f"kept ({method})")
    grid = np.arange(0, sizes.max() + 1)
    right.step(grid, keep_count(grid, eta), where="mid", color="tab:red", lw=1, label=f"rule, eta={eta:g}")
    right.set(title="kept per cluster", xlabel=f"{unit} in cluster", ylabel=f"kept {unit}")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return png_bytes(fig)
