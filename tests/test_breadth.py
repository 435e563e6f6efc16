"""The breadth stage: the ranking rule and selection as pure functions, faiss vs scikit-learn k-means, and the
stage itself on the benchmark's prompts (the session's tiny run, and a second run with method=random)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from raybpo.config import BreadthConfig, Config, load_config
from raybpo.data.schema import prompt_key
from raybpo.rundir import StageMissingError
from raybpo.selection.breadth import (
    cluster_and_select,
    dedup_prompts,
    embedding_text,
    num_clusters_for,
    select_cluster,
    select_prompts,
)
from raybpo.selection.clustering import (
    assign_to_centroids,
    keep_count,
    rank_within_clusters,
    select_random,
    spherical_kmeans,
)
from raybpo.stages.breadth import PROMPTS_SCHEMA

TINY = Path(__file__).with_name("tiny.yaml")

# --------------------------------------------------------------------------- pure functions


def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    sizes = np.array([0, 1, 4, 5, 9, 14, 15, 24, 25, 45, 100])
    assert keep_count(sizes, 0.1).tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 3, 5, 10]
    assert keep_count(sizes, 1.0).tolist() == sizes.tolist()
    assert keep_count(np.array([3, 2, 7]), 0.5).tolist() == [2, 1, 4]  # 1.5 -> 2, 1 -> 1, 3.5 -> 4
    assert keep_count(np.array([1, 2]), 0.01).tolist() == [1, 1]
    assert keep_count(90, 0.35) == 32  # 0.35 * 90 = 31.499999999999996 in floating point: still a half


def test_ranking_rule_on_a_hand_made_example():
    # cluster 0: similarities 0.5, 0.9 (key d), 0.9 (key c, wins the tie), 0.1; cluster 1: 0.2, 0.8; cluster 2: one
    cluster = np.array([0, 0, 0, 1, 1, 0, 2])
    similarity = np.array([0.5, 0.9, 0.9, 0.2, 0.8, 0.1, 0.3], dtype=np.float32)
    keys = ["e", "d", "c", "b", "a", "f", "g"]
    rank = rank_within_clusters(cluster, similarity, keys)
    assert rank.tolist() == [2, 1, 0, 1, 0, 3, 0]
    # eta 0.5 with a fourth, empty cluster: sizes 4, 2, 1, 0 keep 2, 1, 1, 0
    kept = select_cluster(cluster, rank, eta=0.5, k=4)
    assert kept.tolist() == [False, True, True, False, True, False, True]
    # eta 0.1: every non-empty cluster keeps its closest prompt only
    assert select_cluster(cluster, rank, eta=0.1, k=4).tolist() == [False, False, True, False, True, False, True]


def test_assignment_is_the_centroid_of_largest_cosine():
    angles = np.deg2rad([0, 30, 80, 100, 170])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    centroids = np.array([[2.0, 0.0], [0.0, 0.5]], dtype=np.float32)  # not unit: assignment normalises them
    cluster, similarity = assign_to_centroids(x, centroids)
    assert cluster.tolist() == [0, 0, 1, 1, 1]
    expected = np.maximum(np.cos(angles), np.sin(angles))
    np.testing.assert_allclose(similarity, expected, atol=1e-6)


def test_dedup_normalises_keeps_the_first_pair_and_counts():
    distinct = dedup_prompts(
        ["p3", "p1", "p2", "p4", "p5"],
        ["Hello  World", "hello world", "Other?", " HELLO\nworld ", "other?"],
    )
    assert len(distinct.keys) == 2 and distinct.keys == sorted(distinct.keys)
    by_key = dict(zip(distinct.keys, zip(distinct.prompts, distinct.pair_ids, strict=True), strict=True))
    assert by_key[prompt_key("hello world")] == ("hello world", ["p1", "p3", "p4"])
    assert by_key[prompt_key("Other?")] == ("Other?", ["p2", "p5"])
    assert sorted(distinct.pairs) == [2, 3]


def test_chat_prompts_embed_their_last_user_message():
    chat = json.dumps(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "the last question"},
        ]
    )
    assert embedding_text(chat) == "the last question"
    assert embedding_text("Describe the volcano.") == "Describe the volcano."
    assert embedding_text('[{"role": "system", "content": "only"}]') == "only"


def test_number_of_clusters():
    cfg = BreadthConfig()  # about 50 prompts per cluster
    assert [num_clusters_for(n, cfg) for n in (1, 10, 24, 25, 120, 125, 1000)] == [1, 1, 1, 1, 2, 3, 20]
    assert num_clusters_for(5, BreadthConfig(num_clusters=7)) == 5  # never more clusters than prompts
    assert num_clusters_for(500, BreadthConfig(num_clusters=7)) == 7


def _blobs(seed: int = 0, k: int = 5, per_blob: int = 40, dim: int = 16, noise: float = 0.05):
    """k Gaussian blobs around orthonormal centres, projected onto the unit sphere."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:k]
    labels = np.repeat(np.arange(k), per_blob)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_faiss_spherical_kmeans_agrees_with_sklearn_on_blobs():
    x, labels = _blobs()
    centroids, objective = spherical_kmeans(x, 5, seed=0)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    ours, similarity = assign_to_centroids(x, centroids)
    theirs = KMeans(n_clusters=5, n_init=1, random_state=0).fit(x).labels_
    assert adjusted_rand_score(ours, theirs) == 1.0
    assert adjusted_rand_score(ours, labels) == 1.0
    assert objective == pytest.approx(float(similarity.sum()), rel=1e-3)


def test_selection_methods_and_seeds():
    x, _ = _blobs(seed=1, per_blob=40)
    keys = [f"{i:04d}" for i in range(len(x))]
    cfg = BreadthConfig(num_clusters=5, eta=0.1)
    first = cluster_and_select(x, keys, cfg, seed=0)
    again = cluster_and_select(x, keys, cfg, seed=0)
    assert np.array_equal(first.cluster, again.cluster) and np.array_equal(first.kept, again.kept)
    assert first.kept.sum() == 5 * 4  # 5 clusters of 40, round(0.1 * 40) = 4 each
    sizes = np.bincount(first.cluster, minlength=5)
    assert np.bincount(first.cluster[first.kept], minlength=5).tolist() == keep_count(sizes, 0.1).tolist()

    random = select_prompts("random", first.cluster, first.rank, 0.1, 5, seed=0)
    assert random.sum() == first.kept.sum()
    assert np.array_equal(random, select_prompts("random", first.cluster, first.rank, 0.1, 5, seed=0))
    assert not np.array_equal(random, select_random(len(x), int(first.kept.sum()), seed=1))
    assert select_prompts("all", first.cluster, first.rank, 0.1, 5, seed=0).all()
    everything = cluster_and_select(x, keys, cfg.model_copy(update={"method": "all"}), seed=0)
    assert everything.kept.all() and np.array_equal(everything.cluster, first.cluster)


def test_missing_ingest_is_a_clear_error(tmp_path):
    with pytest.raises(StageMissingError, match="run `raybpo ingest` first"):
        from raybpo.stages.breadth import run_breadth

        run_breadth(Config(run_dir=str(tmp_path / "empty")))


# --------------------------------------------------------------------------- the stage on Ray


@pytest.fixture(scope="module")
def breadth_run(tiny_run, tmp_path_factory):
    """(config, manifest): the breadth stage of the session's tiny run (tests/tiny.yaml: 120 benchmark pairs over
    24 prompts, so most prompts have several pairs), its ingest and breadth copied into a run dir of this module."""
    run = tmp_path_factory.mktemp("breadth") / "run"
    for stage in ("ingest", "breadth"):
        shutil.copytree(tiny_run.path / stage, run / stage)
    cfg = load_config(TINY, [f"run_dir={run}"])
    return cfg, json.loads((run / "breadth" / "manifest.json").read_text())


def _prompts(run_dir: str):
    return pads.dataset(f"{run_dir}/breadth/prompts", format="parquet").to_table()


def test_stage_on_the_benchmark_prompts(breadth_run):
    from raybpo.stages.breadth import run_breadth

    cfg, m = breadth_run
    eta = cfg.breadth.eta
    pairs = pads.dataset(f"{cfg.run_dir}/ingest/pairs", format="parquet").to_table(columns=["pair_id", "prompt"])
    distinct = {prompt_key(p) for p in pairs["prompt"].to_pylist()}
    assert m["rows_in"] == pairs.num_rows == 120
    assert m["prompts_distinct"] == len(distinct) and m["duplicates_removed"] == 120 - len(distinct) > 0
    assert m["rows_in"] == m["prompts_distinct"] + m["duplicates_removed"]
    assert m["prompts_distinct"] == m["rows_out"] + m["prompts_not_kept"] and m["rows_quarantined"] == 0
    assert m["num_clusters"] == num_clusters_for(len(distinct), cfg.breadth)
    assert (m["method"], m["embedder"], m["embedding_dim"]) == ("cluster", "all-MiniLM-L6-v2", 384)
    assert set(m["input_hashes"]) == {"ingest"} and m["config"]["breadth"]["eta"] == eta == 0.5

    table = _prompts(cfg.run_dir)
    assert table.schema.equals(PROMPTS_SCHEMA, check_metadata=False)
    assert table.num_rows == m["prompts_distinct"] and set(table["prompt_key"].to_pylist()) == distinct
    assert sum(table["pairs"].to_pylist()) == 120
    assert sorted(i for ids in table["pair_ids"].to_pylist() for i in ids) == sorted(pairs["pair_id"].to_pylist())
    assert int(pc.sum(table["kept"]).as_py()) == m["rows_out"]
    rows = table.to_pylist()
    for c in range(m["num_clusters"]):
        members = sorted((r for r in rows if r["cluster"] == c), key=lambda r: r["rank"])
        if not members:
            continue
        assert [r["rank"] for r in members] == list(range(len(members)))
        similarities = [r["similarity"] for r in members]
        assert similarities == sorted(similarities, reverse=True)
        keep = int(keep_count(len(members), eta))
        assert keep >= 1 and [r["kept"] for r in members] == [True] * keep + [False] * (len(members) - keep)
    sizes = [sum(r["cluster"] == c for r in rows) for c in range(m["num_clusters"])]
    assert m["cluster_sizes"]["max"] == max(sizes) and m["rows_out"] == int(keep_count(np.array(sizes), eta).sum())
    assert m["outputs"] == {"prompts": "prompts/", "plot": "cluster_sizes.png"}
    with open(f"{cfg.run_dir}/breadth/cluster_sizes.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"

    again = run_breadth(cfg)  # the same config and ingest: skipped
    assert again.skipped and again.manifest == m


def test_same_seed_same_clusters_and_random_keeps_the_same_count(breadth_run, tmp_path):
    """A second, independent run (another run dir, same ingest, same seed) with method=random: the same
    embeddings and clusters, so the cluster rule selects the same prompts, and random keeps as many."""
    from raybpo.stages.breadth import run_breadth

    cfg, first = breadth_run
    other = cfg.model_copy(update={"run_dir": str(tmp_path / "run")})
    other.breadth = cfg.breadth.model_copy(update={"method": "random"})
    shutil.copytree(f"{cfg.run_dir}/ingest", tmp_path / "run" / "ingest")
    second = run_breadth(other).manifest
    assert second["method"] == "random" and second["rows_out"] == first["rows_out"]
    assert second["num_clusters"] == first["num_clusters"]

    a = _prompts(cfg.run_dir).sort_by("prompt_key").to_pydict()
    b = _prompts(other.run_dir).sort_by("prompt_key").to_pydict()
    assert a["prompt_key"] == b["prompt_key"] and a["cluster"] == b["cluster"] and a["rank"] == b["rank"]
    np.testing.assert_allclose(a["similarity"], b["similarity"], atol=1e-5)
    by_rule = select_cluster(np.array(b["cluster"]), np.array(b["rank"]), cfg.breadth.eta, second["num_clusters"])
    assert by_rule.tolist() == a["kept"]  # same seed, same kept set
    assert sum(b["kept"]) == sum(a["kept"])
