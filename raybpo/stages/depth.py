"""The `depth` stage of BPO (docs/ALGORITHMS.md 3.3 and 4): pick response pairs by clustering their gradients.

    score/candidate_pairs -> per-pair LoRA gradient of the DPO loss (batched, Ray Data actor pool)
        -> seeded Rademacher projection to d, L2-normalised -> depth/features/
        -> spherical k-means (faiss, K_g) -> top eta_g of every cluster (+ one pair for every prompt left out)
        -> depth/selections/{bpo, random, uniform, original}/ at the same budget

- Features (`GradientFeaturizer`, `depth.concurrency` actors with `depth.num_gpus` GPUs each): the policy is
  the SFT model (the reference) with the train stage's LoRA adapters (`train.lora_*`), fresh (peft's init
  with `lora_B` = 0, A seeded by `seed`, so every actor holds the same adapter) or warmed up
  (`depth.warmup_steps` > 0: a short DPO run with AdamW on a seeded sample of the pairs, as LESS warms up).
  Pairs are tokenised as the train stage does (`encode_pair`); one that cannot fit is quarantined
  (`does_not_fit`). Per batch of `depth.batch_size` length-sorted pairs, `batched_pair_gradients` gives every
  pair's gradient from one forward and one backward; optional LESS Adam preconditioning; the projection
  (`raybpo.projection`); the norm before projection is kept as `grad_norm` (the `norm` strategy ranks by it).
- Selection: the clustering, the **raybpo rule** (`bpo`) and the `random`, `uniform` and `original` baselines at
  its budget are `raybpo.selection.depth`, free of Ray; k-means runs on the driver, on a GPU when faiss sees one
  and `depth.num_gpus` > 0.

Outputs: `depth/features/` (pair_id, prompt_key, grad_norm, feature as float16/float32 vectors),
`depth/selections/<name>/` (canonical pairs plus prompt_key, allocation, cluster, similarity, grad_norm), the
plots `pairs_per_prompt.png` (the paper's Figure 4: pairs per prompt of bpo against uniform; `original` has
one per prompt) and
`cluster_sizes.png`. The train stage trains on `selections/<depth.selection>`. Counts: rows_in = candidate
pairs = featured + quarantined; featured = selected + not selected (in the manifest).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raybpo.artifacts import (
    CANDIDATE_PAIRS,
    DEPTH,
    DEPTH_CLUSTER_SIZES,
    DEPTH_FEATURES,
    DEPTH_FEATURES_FILE,
    DEPTH_PAIRS_PER_PROMPT,
    DEPTH_QUARANTINE,
    DEPTH_WARMUP,
    INGEST,
    SCORE,
    depth_selection,
    depth_selection_file,
    in_stage,
    ingested_pairs,
    read_table,
    reference_model,
    relpath,
)
from raybpo.cluster import init_ray
from raybpo.config import Config, DepthConfig
from raybpo.data.schema import PAIR_SCHEMA, prompt_key
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
from raybpo.selection.clustering import (
    ClusterCounts,
    cluster_counts,
    count_stats,
    kmeans_record,
    plot_cluster_sizes,
    use_faiss_gpu,
)
from raybpo.selection.depth import (
    DepthError,
    PairClusters,
    allocation,
    cluster_pairs,
    plot_pairs_per_prompt,
    select_original,
    select_pairs,
    strategy_score,
    warmup_sample,
)
from raybpo.stages.depth_features import PAIR_TEXT, compute_features, warm_up_task

log = logging.getLogger(__name__)

STAGE = DEPTH
# The train settings the features depend on (the adapters and the tokenisation), part of the stage's identity;
# the rest of `train` (learning rate, beta-DPO, ...) does not redo the stage.
TRAIN_KEYS = {"lora_rank", "lora_alpha", "lora_target_modules", "max_length", "max_prompt_length"}
SELECTION_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        pa.field("prompt_key", pa.string(), nullable=False),
        pa.field("allocation", pa.int64(), nullable=False),
        pa.field("cluster", pa.int64()),
        pa.field("similarity", pa.float32()),
        pa.field("grad_norm", pa.float32()),
    ]
)


# --------------------------------------------------------------------------- the stage's steps


def with_prompt_key(pairs: pa.Table) -> pa.Table:
    """Pairs by pair_id, with their `prompt_key` column."""
    pairs = pairs.sort_by("pair_id")
    return pairs.append_column("prompt_key", pa.array([prompt_key(p) for p in pairs["prompt"].to_pylist()]))


def read_candidate_pairs(run_dir: RunDir) -> pa.Table:
    """The score stage's candidate pairs with their prompt keys; none is a `DepthError`."""
    pairs = read_table(run_dir, CANDIDATE_PAIRS)
    if pairs.num_rows == 0:
        raise DepthError(f"{run_dir.uri_of(*CANDIDATE_PAIRS)} holds no pairs: nothing to select from")
    return with_prompt_key(pairs)


def warm_up_adapter(cfg: Config, run_dir: RunDir, reference: str, pairs: pa.Table) -> bytes:
    """The LESS-style warm-up on a seeded sample of the pairs, on a Ray task; its blob is kept in the stage."""
    depth = cfg.depth
    sample = warmup_sample(pairs.num_rows, depth.warmup_steps * depth.batch_size, cfg.seed)
    rows = pairs.select(list(PAIR_TEXT)).take(sample).to_pylist()
    warmup = ray.get(
        # DEFAULT: inside a Tune trial the task must not join the trial's (CPU-less) placement group
        warm_up_task.options(num_gpus=depth.num_gpus, scheduling_strategy="DEFAULT").remote(
            reference,
            cfg.policy.model_dump(mode="json"),
            cfg.train.model_dump(mode="json"),
            depth.model_dump(mode="json"),
            cfg.seed,
            rows,
        )
    )
    run_dir.write_bytes(relpath(DEPTH_WARMUP), warmup)
    log.info("depth: warm-up of %d steps on %d pairs", -(-len(rows) // depth.batch_size), len(rows))
    return warmup


@dataclass
class Featured:
    """The featured pairs (by pair_id) with their unit features and gradient norms, and the quarantined rows."""

    pairs: pa.Table
    features: np.ndarray
    grad_norm: np.ndarray
    quarantined: pa.Table


def keep_featured(run_dir: RunDir, pairs: pa.Table, features: pa.Table) -> Featured:
    """The pairs with a feature; writes `depth/features/` and the quarantine (the pairs that do not fit)."""
    bad = pc.not_equal(features["reason"], "")
    quarantined = features.filter(bad)
    featured = features.filter(pc.invert(bad))
    pairs = pairs.filter(pc.is_in(pairs["pair_id"], featured["pair_id"]))  # both sorted by pair_id
    if pairs.num_rows == 0:
        raise DepthError("no candidate pair fits train.max_length: raise it or shorten the responses")
    run_dir.makedirs(*DEPTH_FEATURES)
    pq.write_table(
        pa.table(
            {
                "pair_id": pairs["pair_id"],
                "prompt_key": pairs["prompt_key"],
                "grad_norm": featured["grad_norm"],
                "feature": featured["feature"],
            }
        ),
        run_dir.path(*DEPTH_FEATURES_FILE),
        filesystem=run_dir.fs,
    )
    if quarantined.num_rows:
        pq.write_table(
            quarantined.drop_columns(["feature", "grad_norm"]),
            run_dir.path(*DEPTH_QUARANTINE),
            filesystem=run_dir.fs,
        )
    flat = featured["feature"].combine_chunks()
    matrix = flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), flat.type.list_size)
    return Featured(pairs, matrix.astype(np.float32), featured["grad_norm"].to_numpy(), quarantined)


def select_featured(cfg: Config, featured: Featured, clusters: PairClusters) -> dict[str, np.ndarray]:
    """The `bpo`, `random` and `uniform` masks over the featured pairs, ranked by `depth.strategy`'s score."""
    pairs = featured.pairs
    ids = np.asarray(pairs["pair_id"].to_pylist(), dtype=str)
    keys = np.asarray(pairs["prompt_key"].to_pylist(), dtype=str)
    gaps = (pc.subtract(pairs["score_chosen"], pairs["score_rejected"])).fill_null(0.0).to_numpy()
    score = strategy_score(cfg.depth.strategy, clusters.similarity, featured.grad_norm, cfg.seed)
    return select_pairs(clusters, score, ids, keys, gaps, cfg.depth, cfg.seed)


def _selection_table(pairs: pa.Table, kept: np.ndarray, extra: dict[str, Any]) -> pa.Table:
    keys = np.asarray(pairs["prompt_key"].to_pylist(), dtype=str)
    columns = {name: pairs[name] for name in PAIR_SCHEMA.names}
    columns["prompt_key"] = pairs["prompt_key"]
    columns["allocation"] = pa.array(allocation(keys, kept))
    for name in ("cluster", "similarity", "grad_norm"):
        columns[name] = pa.array(extra[name]) if name in extra else pa.nulls(pairs.num_rows)
    table = pa.table(columns).cast(SELECTION_SCHEMA)
    return table.filter(pa.array(kept)).sort_by([("prompt_key", "ascending"), ("pair_id", "ascending")])


def select_and_write(
    cfg: Config, run_dir: RunDir, featured: Featured, clusters: PairClusters, kept: dict[str, np.ndarray]
) -> dict[str, pa.Table]:
    """`depth/selections/<name>/` for bpo, its `random` and `uniform` baselines and `original` at its budget."""
    extra = {"cluster": clusters.cluster, "similarity": clusters.similarity, "grad_norm": featured.grad_norm}
    tables = {name: _selection_table(featured.pairs, mask, extra) for name, mask in kept.items()}
    original = with_prompt_key(ingested_pairs(run_dir))
    original_keys = np.asarray(original["prompt_key"].to_pylist(), dtype=str)
    tables["original"] = _selection_table(
        original, select_original(original_keys, int(kept["bpo"].sum()), cfg.seed), {}
    )
    for name, table in tables.items():
        run_dir.makedirs(*depth_selection(name))
        pq.write_table(table, run_dir.path(*depth_selection_file(name)), filesystem=run_dir.fs)
    return tables


def write_plots(run_dir: RunDir, depth: DepthConfig, tables: dict[str, pa.Table], counts: ClusterCounts) -> dict:
    """`pairs_per_prompt.png` (bpo against uniform) and `cluster_sizes.png`; every selection's pairs per prompt."""
    per_prompt = {
        name: np.array(list(Counter(table["prompt_key"].to_pylist()).values())) for name, table in tables.items()
    }
    chart = plot_pairs_per_prompt({name: per_prompt[name] for name in ("bpo", "uniform")})
    run_dir.write_bytes(relpath(DEPTH_PAIRS_PER_PROMPT), chart)
    chart = plot_cluster_sizes(counts, depth.eta, depth.strategy, unit="pairs")
    run_dir.write_bytes(relpath(DEPTH_CLUSTER_SIZES), chart)
    return per_prompt


def depth_extra(
    depth: DepthConfig,
    featured: Featured,
    clusters: PairClusters,
    tables: dict[str, pa.Table],
    per_prompt: dict[str, np.ndarray],
    counts: ClusterCounts,
    use_gpu: bool,
) -> dict[str, Any]:
    """The manifest's selection numbers: the budget, every selection's pairs and prompts, the clustering."""
    n, selected = featured.pairs.num_rows, tables[depth.selection].num_rows
    return {
        "featured": n,
        "selection": depth.selection,
        "selected": selected,
        "not_selected": None if depth.selection == "original" else n - selected,
        "budget": tables["bpo"].num_rows,
        "prompts": len(set(featured.pairs["prompt_key"].to_pylist())),
        "selections": {
            name: {
                "pairs": table.num_rows,
                "prompts": len(per_prompt[name]),
                "pairs_per_prompt": count_stats(per_prompt[name]),
            }
            for name, table in tables.items()
        },
        "strategy": depth.strategy,
        "eta": depth.eta,
        "num_clusters": clusters.num_clusters,
        "empty_clusters": counts.empty,
        "kmeans": kmeans_record(use_gpu, clusters.objective),
    }


def feature_extra(depth: DepthConfig, rows_in: int, timings: dict[str, float]) -> dict[str, Any]:
    """The manifest's feature settings and their throughput."""
    return {
        "projection_dim": depth.projection_dim,
        "dtype": depth.dtype,
        "warmup_steps": depth.warmup_steps,
        "adam_preconditioning": depth.adam_preconditioning,
        "pairs_per_second": round(rows_in / max(timings["features"], 1e-9), 2),
    }


def outputs(tables: dict[str, pa.Table], quarantined: bool, warmup: bool) -> dict[str, str]:
    """The manifest's `outputs`: every file and folder the stage wrote, relative to it."""
    return {
        "features": in_stage(DEPTH_FEATURES, folder=True),
        **{f"selection_{name}": in_stage(depth_selection(name), folder=True) for name in tables},
        "pairs_per_prompt": in_stage(DEPTH_PAIRS_PER_PROMPT),
        "cluster_sizes": in_stage(DEPTH_CLUSTER_SIZES),
        **({"quarantine": in_stage(DEPTH_QUARANTINE)} if quarantined else {}),
        **({"warmup": in_stage(DEPTH_WARMUP)} if warmup else {}),
    }


def run_depth(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `depth` stage: gradient features, clustering, the BPO selection and its baselines (module doc)."""
    run_dir = RunDir(cfg.run_dir)
    score = require_stage(run_dir, SCORE)
    ingest = require_stage(run_dir, INGEST)
    source = reference_model(cfg, run_dir)
    reference = source.uri
    inputs = {
        "score": stage_identity(score),
        "ingest": stage_identity(ingest),
        "reference": source.identity,
        "train_lora_and_lengths": json.dumps(cfg.train.model_dump(mode="json", include=TRAIN_KEYS), sort_keys=True),
    }
    depth = cfg.depth

    def body(stage_path: str) -> StageCounts:
        timings: dict[str, float] = {}
        pairs = read_candidate_pairs(run_dir)
        warmup = None
        if depth.warmup_steps:
            started = time.perf_counter()
            warmup = warm_up_adapter(cfg, run_dir, reference, pairs)
            timings["warmup"] = time.perf_counter() - started

        started = time.perf_counter()
        features = compute_features(pairs, reference, cfg, warmup)
        timings["features"] = time.perf_counter() - started
        featured = keep_featured(run_dir, pairs, features)

        started = time.perf_counter()
        use_gpu = use_faiss_gpu(depth.num_gpus)
        clusters = cluster_pairs(featured.features, depth, cfg.seed, use_gpu=use_gpu)
        kept = select_featured(cfg, featured, clusters)
        tables = select_and_write(cfg, run_dir, featured, clusters, kept)
        timings["cluster_select"] = time.perf_counter() - started

        counts = cluster_counts(clusters.cluster, kept["bpo"], clusters.num_clusters)
        per_prompt = write_plots(run_dir, depth, tables, counts)
        extra = depth_extra(depth, featured, clusters, tables, per_prompt, counts, use_gpu)
        log.info(
            "depth: %d candidate pairs (%d prompts) -> %d clusters -> %d pairs kept by bpo; %s trains on %d",
            *(extra[key] for key in ("featured", "prompts", "num_clusters", "budget", "selection", "selected")),
        )
        quarantined = featured.quarantined
        rows_in = featured.pairs.num_rows + quarantined.num_rows
        return StageCounts(
            rows_in=rows_in,
            rows_out=extra["selected"],
            rows_quarantined=quarantined.num_rows,
            quarantine_reasons=dict(Counter(r.split(":", 1)[0] for r in quarantined["reason"].to_pylist())),
            extra={
                **extra,
                "features": feature_extra(depth, rows_in, timings),
                "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
                "outputs": outputs(tables, quarantined.num_rows > 0, warmup is not None),
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("policy", "depth"), inputs, body)
