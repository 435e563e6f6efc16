"""The breadth stage on Ray Data against plain in-process sentence-transformers + scikit-learn KMeans (CPU).

Both sides get the same distinct prompts, the same embedder (the bundled all-MiniLM-L6-v2), the same number of
clusters K_b and the same ranking rule (`raybpo.selection.clustering`: top round_half_up(eta * size) of every cluster
by cosine similarity to its centroid, at least one). Reported: prompts per second of each, end to end, the
ratio, and how much the two selections agree (Jaccard index of the kept sets, adjusted Rand index of the
cluster assignments).

- raybpo: `run_breadth` on a run dir whose ingest stage holds the prompts (the project's own `ingest` of a
  generated TRL JSONL, not timed; Ray is already up). Timed: the whole stage call: reading the pairs,
  deduplication, the embedding actor pool (`--concurrency` actors of 1 CPU each, process start, model import
  and load included), faiss spherical k-means with the greedy k-means++ init, the ranking, writing the Parquet,
  the plot and the manifest. The stage's own phase timings come from its manifest.
- in-process: a fresh Python process (started after Ray is shut down) that times `import sentence_transformers`,
  `SentenceTransformer(...)` load, one `encode(..., normalize_embeddings=True)` call over all prompts
  (`--threads` torch threads), scikit-learn `KMeans(n_clusters=K_b, n_init=1, random_state=seed)` (its
  defaults otherwise: greedy k-means++ init, Lloyd, up to 300 iterations) on the unit embeddings, assignment
  by the largest cosine to the normalised centroids (spherical in effect), and the same ranking rule. Reading
  the prompt list from a JSON file is not timed.
- in-process + faiss: the same process and embeddings, clustered with raybpo's own `cluster_and_select`
  (faiss); its time is model import + load + encode + that clustering. Its agreement with the stage shows how
  much of the difference comes from the k-means implementation rather than the pipeline. For scale, the script
  also prints how far raybpo's own clustering moves when only its seed changes (seed + 1, not timed).

Prompts: the benchmark's 720 templated prompts are too few, so the script combines the benchmark's vocabulary
(`raybpo.data.benchmark`: 30 topics with 4 fact words each, 8 templates, 3 openers, filler words) with 1 or 2
seeded extra clauses (`EXTRAS`: fact words of the topic or of another one, numbers 2..60, another topic to
compare with), drawing until `--prompts` prompts are distinct under the stage's normalised key.

    .venv/bin/python bench/breadth_vs_inprocess.py --prompts 20000 --batch-size 256 --concurrency 2 --threads 2

OpenMP: with other jobs on the cores, spinning OpenMP threads stall each other, so the script sets
`OMP_WAIT_POLICY=PASSIVE` before torch loads unless the environment sets it (Ray's workers inherit it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the module doc
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raybpo.data.benchmark import FILLER, OPENERS, TEMPLATES, TOPICS
from raybpo.data.schema import prompt_key

EXTRAS = (
    "Mention {fact} and {fact2}.",
    "Use at most {number} words.",
    "Explain it to a {number}-year-old.",
    "Compare it with the {other}.",
    "Is it {filler} {fact}?",
    "Focus on why it is {fact}.",
    "Give me {number} examples.",
    "Say something {filler} {fact} about the {other} too.",
)
EMBEDDER = "all-MiniLM-L6-v2"


def make_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (prompt, topic) pairs, distinct under `prompt_key`, from the benchmark's vocabulary (module doc)."""
    rng = np.random.default_rng([seed, 7])
    topics = list(TOPICS)
    facts = [f for t in topics for f in TOPICS[t]]
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    while len(out) < n:
        topic = topics[int(rng.integers(len(topics)))]
        text = OPENERS[int(rng.integers(len(OPENERS)))] + TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(
            topic=topic
        )
        for _ in range(int(rng.integers(1, 3))):
            own = TOPICS[topic]
            text += " " + EXTRAS[int(rng.integers(len(EXTRAS)))].format(
                fact=own[int(rng.integers(4))] if rng.random() < 0.8 else facts[int(rng.integers(len(facts)))],
                fact2=own[int(rng.integers(4))],
                number=int(rng.integers(2, 61)),
                other=topics[int(rng.integers(len(topics)))],
                filler=FILLER[int(rng.integers(len(FILLER)))],
            )
        key = prompt_key(text)
        if key not in seen:
            seen.add(key)
            out.append((text, topic))
    return out


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


# --------------------------------------------------------------------------- the in-process side


def inprocess(job: Path) -> None:
    """Run in a fresh process: embed, cluster (sklearn, then faiss) and select; write the results to JSON."""
    spec = json.loads(job.read_text())
    keys, texts = spec["keys"], spec["texts"]
    from raybpo.config import BreadthConfig
    from raybpo.selection.breadth import cluster_and_select, select_cluster
    from raybpo.selection.clustering import assign_to_centroids, rank_within_clusters
    from raybpo.stages.breadth import resolve_embedder

    started = time.perf_counter()  # torch and sentence-transformers are imported inside the timing, as in an actor
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(spec["threads"])
    model = SentenceTransformer(resolve_embedder(EMBEDDER), device="cpu")
    loaded = time.perf_counter()
    embeddings = model.encode(
        texts, batch_size=spec["batch_size"], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    ).astype(np.float32)
    embedded = time.perf_counter()
    from sklearn.cluster import KMeans

    k = spec["num_clusters"]
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=spec["seed"]).fit(embeddings)
    cluster, similarity = assign_to_centroids(embeddings, kmeans.cluster_centers_)
    rank = rank_within_clusters(cluster, similarity, keys)
    kept = select_cluster(cluster, rank, spec["eta"], k)
    sklearn_done = time.perf_counter()

    faiss_started = time.perf_counter()
    cfg = BreadthConfig(num_clusters=k, eta=spec["eta"])
    faiss_sel = cluster_and_select(embeddings, keys, cfg, spec["seed"])
    faiss_s = time.perf_counter() - faiss_started
    other_seed = cluster_and_select(embeddings, keys, cfg, spec["seed"] + 1)  # k-means' own seed-to-seed spread
    result = {
        "import_load_s": loaded - started,
        "embed_s": embedded - loaded,
        "sklearn_s": sklearn_done - embedded,
        "sklearn_iterations": int(kmeans.n_iter_),
        "faiss_s": faiss_s,
        "sklearn": {"cluster": cluster.tolist(), "kept": kept.tolist()},
        "faiss": {"cluster": faiss_sel.cluster.tolist(), "kept": faiss_sel.kept.tolist()},
        "faiss_next_seed": {"cluster": other_seed.cluster.tolist(), "kept": other_seed.kept.tolist()},
    }
    job.with_suffix(".out.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- the driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--clusters", type=int, default=None, help="K_b (default: about 50 prompts per cluster)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=2, help="raybpo embedding actors (1 CPU each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process side")
    parser.add_argument("--eta", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where the run dir goes (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--inprocess-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess_job:
        inprocess(Path(args.inprocess_job))
        return

    import pyarrow.dataset as pads
    import ray
    from sklearn.metrics import adjusted_rand_score

    from raybpo.config import Config, SourceSpec
    from raybpo.selection.breadth import num_clusters_for
    from raybpo.stages.breadth import run_breadth
    from raybpo.stages.ingest import ingest

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="breadth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir (prompts, run dir, in-process results; kept afterwards): {work}", file=sys.stderr)
    prompts = make_prompts(args.prompts, args.seed)
    source = work / "prompts.jsonl"
    with source.open("w") as out:
        for text, topic in prompts:
            row = {"prompt": text, "chosen": f"The {topic} is {TOPICS[topic][0]}.", "rejected": "I do not know."}
            out.write(json.dumps(row) + "\n")

    cfg = Config(run_dir=str(work / "run"), seed=args.seed)
    cfg.ingest.sources = [SourceSpec(path=str(source), format="trl", name="bench")]
    cfg.breadth.eta = args.eta
    cfg.breadth.batch_size = args.batch_size
    cfg.breadth.concurrency = args.concurrency
    cfg.breadth.num_clusters = args.clusters
    started = time.perf_counter()
    ingest(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ingest of {args.prompts} pairs (not timed): {time.perf_counter() - started:.1f} s", file=sys.stderr)

    started = time.perf_counter()
    result = run_breadth(cfg)
    raybpo_s = time.perf_counter() - started
    manifest = result.manifest
    ray.shutdown()
    table = pads.dataset(f"{cfg.run_dir}/breadth/prompts", format="parquet").to_table().sort_by("prompt_key")
    keys = table["prompt_key"].to_pylist()
    ours_cluster = np.array(table["cluster"].to_pylist())
    ours_kept = {k for k, kept in zip(keys, table["kept"].to_pylist(), strict=True) if kept}
    k = manifest["num_clusters"]
    assert k == num_clusters_for(len(keys), cfg.breadth) and len(keys) == args.prompts

    by_key = {prompt_key(text): text for text, _ in prompts}
    job = work / "inprocess.json"
    job.write_text(
        json.dumps(
            {
                "keys": keys,
                "texts": [by_key[key] for key in keys],
                "threads": args.threads,
                "batch_size": args.batch_size,
                "num_clusters": k,
                "eta": args.eta,
                "seed": args.seed,
            }
        )
    )
    subprocess.run([sys.executable, __file__, "--inprocess-job", str(job)], check=True)
    base = json.loads(job.with_suffix(".out.json").read_text())

    n = len(keys)
    timings = manifest["timings_s"]
    sklearn_s = base["import_load_s"] + base["embed_s"] + base["sklearn_s"]
    faiss_s = base["import_load_s"] + base["embed_s"] + base["faiss_s"]
    rows = [
        {
            "pipeline": f"raybpo breadth stage (Ray Data, {args.concurrency} actor{'s' * (args.concurrency > 1)})",
            "wall_s": raybpo_s,
            "embed_s": timings["embed"],
            "cluster_s": timings["cluster_select"],
            "other_s": timings["read_dedup"] + timings["write"],
            "kept": len(ours_kept),
            "jaccard": 1.0,
            "ari": 1.0,
        }
    ]
    for name, wall, cluster_s, side in (
        ("in-process sentence-transformers + sklearn KMeans", sklearn_s, base["sklearn_s"], "sklearn"),
        ("in-process sentence-transformers + raybpo's faiss clustering", faiss_s, base["faiss_s"], "faiss"),
    ):
        kept = {key for key, flag in zip(keys, base[side]["kept"], strict=True) if flag}
        rows.append(
            {
                "pipeline": name,
                "wall_s": wall,
                "embed_s": base["import_load_s"] + base["embed_s"],
                "cluster_s": cluster_s,
                "other_s": 0.0,
                "kept": len(kept),
                "jaccard": jaccard(ours_kept, kept),
                "ari": float(adjusted_rand_score(ours_cluster, base[side]["cluster"])),
            }
        )
    reference = rows[1]["wall_s"]
    print(f"\n{n} prompts, K_b = {k}, eta = {args.eta}, batch {args.batch_size}, seed {args.seed}")
    print(
        "\n| pipeline | wall s | prompts/s | vs sklearn in-process | embed s (incl. load) | cluster + select s "
        "| other s | kept | Jaccard kept vs raybpo | ARI clusters vs raybpo |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['pipeline']} | {row['wall_s']:.1f} | {n / row['wall_s']:.0f} | {reference / row['wall_s']:.2f}x "
            f"| {row['embed_s']:.1f} | {row['cluster_s']:.1f} | {row['other_s']:.1f} | {row['kept']} "
            f"| {row['jaccard']:.3f} | {row['ari']:.3f} |"
        )
    print(
        f"\nin-process: import + load {base['import_load_s']:.1f} s, encode {base['embed_s']:.1f} s, "
        f"sklearn KMeans {base['sklearn_iterations']} iterations; raybpo stage phases: {timings}"
    )
    spread = base["faiss_next_seed"]
    spread_kept = {key for key, flag in zip(keys, spread["kept"], strict=True) if flag}
    seed_spread = {
        "jaccard": jaccard(ours_kept, spread_kept),
        "ari": float(adjusted_rand_score(ours_cluster, spread["cluster"])),
    }
    print(
        f"k-means' own spread: raybpo's faiss clustering of the same embeddings with seed {args.seed + 1} instead "
        f"of {args.seed}: Jaccard of kept sets {seed_spread['jaccard']:.3f}, ARI of clusters {seed_spread['ari']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"prompts": n, "num_clusters": k, "rows": rows, "timings": timings, "seed_spread": seed_spread})
        )


if __name__ == "__main__":
    main()
