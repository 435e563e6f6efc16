"""The built-in benchmark: determinism, partly disagreeing sources, a scorer that works on any text."""

import itertools
import json

import numpy as np
import pytest

from raybpo.config import BenchmarkConfig
from raybpo.data import benchmark as bm

SMALL = BenchmarkConfig(pairs_per_source=200, train_prompts=120, eval_prompts=24)


def _rows(files: dict[str, bytes], name: str) -> list[dict]:
    return [json.loads(line) for line in files[name].decode().splitlines()]


def test_same_seed_same_bytes_other_seed_other_bytes():
    first, again = bm.generate(SMALL), bm.generate(SMALL)
    assert first == again
    assert set(first) == {"helpful.jsonl", "concise.jsonl", "harmless.jsonl", bm.EVAL_PROMPTS}
    other = bm.generate(SMALL.model_copy(update={"seed": 1}))
    assert all(first[name] != other[name] for name in first)


def test_held_out_prompts_are_disjoint_from_training_prompts():
    files = bm.generate(SMALL)
    held_out = {row["prompt"] for row in _rows(files, bm.EVAL_PROMPTS)}
    trained = {row["prompt"] for source in bm.SOURCES for row in _rows(files, f"{source}.jsonl")}
    assert len(held_out) == 24 and not held_out & trained
    with pytest.raises(ValueError, match="exceeds the 720 distinct prompts"):
        bm.split_prompts(BenchmarkConfig(train_prompts=700, eval_prompts=48))


def test_gap_buckets_and_flipped_share():
    cfg = SMALL.model_copy(update={"pairs_per_source": 600})
    for source in bm.SOURCES:
        rows = bm.generate_pairs(cfg, source, bm.split_prompts(cfg)[0])
        for row in rows:
            assert bm.utility(source, row["prompt"], row["chosen"]) == pytest.approx(row["utility_chosen"], abs=1e-6)
            gap = (row["utility_chosen"] - row["utility_rejected"]) * (-1 if row["flipped"] else 1)
            low, high = cfg.high_gap if row["gap_bucket"] == "high" else cfg.low_gap
            assert low - 1e-6 <= gap <= high + 1e-6
        flipped = np.mean([row["flipped"] for row in rows])
        high_share = np.mean([row["gap_bucket"] == "high" for row in rows])
        assert 0.06 < flipped < 0.14 and 0.42 < high_share < 0.58


def test_sources_partly_disagree():
    """On random response pairs the sources agree mostly but not always (MORE's diverse preferences)."""
    rng = np.random.default_rng(0)
    prompts = bm.split_prompts(SMALL)[0]
    signs = {s: [] for s in bm.SOURCES}
    for _ in range(1000):
        prompt, topic = prompts[int(rng.integers(len(prompts)))]
        a, b = bm.sample_response(rng, topic), bm.sample_response(rng, topic)
        for source in bm.SOURCES:
            signs[source].append(np.sign(bm.utility(source, prompt, a) - bm.utility(source, prompt, b)))
    for x, y in itertools.combinations(bm.SOURCES, 2):
        disagreement = np.mean(np.array(signs[x]) != np.array(signs[y]))
        assert 0.15 < disagreement < 0.5, (x, y, disagreement)


def test_scorer_ranks_a_good_response_above_a_bad_one_for_every_source():
    prompt = "Describe the volcano."
    good = "Sure! The volcano has lava, magma and a vent."
    bad = "I hate this. It is a stupid stupid stupid question about pollen."
    for source in bm.SOURCES:
        assert bm.utility(source, prompt, good) > bm.utility(source, prompt, bad) + 2
    assert bm.mean_utility(prompt, good) > bm.mean_utility(prompt, bad)


def test_scorer_works_on_any_text():
    assert bm.prompt_topic("Hello there") is None
    assert np.isfinite(bm.utility("helpful", "Hello there", ""))
    assert np.isfinite(bm.mean_utility("Tell me about the cat.", "\u00e9\u00e8 12 ### \n- - -"))
    with pytest.raises(KeyError, match="unknown benchmark source 'nope'"):
        bm.utility("nope", "p", "r")


def test_sources_disagree_on_length_as_documented():
    prompt = "Tell me about the cat."
    short = "The cat is furry."
    long = "The cat is small furry purrs and whiskers really quite often also very so just."
    assert bm.utility("concise", prompt, short) > bm.utility("concise", prompt, long)
    assert bm.utility("helpful", prompt, long) > bm.utility("helpful", prompt, short)
