"""The built-in benchmark: generated preference data with a known ground truth, fully offline.

Prompts ask about one of 30 topics ("Describe the volcano."). Every topic has four fact words
("lava", "magma", ...). A response is scored from attributes anyone can check in its text:

    facts       correct fact words of the prompt's topic (up to 3)     relevance / knowledge
    wrong       fact words of other topics (up to 3)                   hallucination
    mention     names the topic
    polite      a courtesy word ("sure", "glad", ...)
    unsafe      an insult ("stupid", "hate", ...)
    length      closeness of the word count to the source's preferred length
    listed      formatted as a "- " list
    repetition  share of repeated words

Each source has a hidden linear utility over these attributes (`SOURCE_WEIGHTS`). The sources agree
on knowledge, hallucination and insults but disagree on length, politeness and lists, as the
diverse datasets of MORE do. `utility(source, prompt, response)` scores ANY text, so the policy's
own generations are judged by the same ground truth; `mean_utility` averages the sources.

Pairs have a controlled utility gap (low or high, `BenchmarkConfig`) and a share of flipped labels
(the outliers beta-DPO's filter is for). Everything is drawn from seeded numpy generators: the same
config gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from raybpo.config import BenchmarkConfig

GENERATOR_VERSION = "1"
EVAL_PROMPTS = "eval_prompts.jsonl"

TOPICS: dict[str, tuple[str, ...]] = {
    "cat": ("small", "furry", "purrs", "whiskers"),
    "dog": ("loyal", "barks", "playful", "fetch"),
    "sun": ("hot", "bright", "star", "yellow"),
    "moon": ("craters", "tides", "orbit", "pale"),
    "ocean": ("salty", "waves", "deep", "vast"),
    "river": ("flows", "fresh", "banks", "current"),
    "forest": ("trees", "green", "shady", "moss"),
    "desert": ("dry", "sand", "dunes", "cactus"),
    "mountain": ("tall", "peak", "snowy", "rocky"),
    "rain": ("wet", "clouds", "drops", "puddles"),
    "snow": ("cold", "white", "flakes", "winter"),
    "fire": ("warm", "flames", "smoke", "ash"),
    "bread": ("baked", "flour", "crust", "yeast"),
    "apple": ("crisp", "red", "juicy", "orchard"),
    "coffee": ("bitter", "roasted", "caffeine", "beans"),
    "tea": ("leaves", "steeped", "herbal", "kettle"),
    "piano": ("keys", "chords", "melody", "pedals"),
    "guitar": ("strings", "strum", "frets", "acoustic"),
    "book": ("pages", "chapters", "author", "story"),
    "train": ("rails", "station", "engine", "carriages"),
    "bicycle": ("wheels", "spokes", "saddle", "gears"),
    "ship": ("sails", "harbor", "hull", "anchor"),
    "garden": ("flowers", "soil", "seeds", "hedges"),
    "bee": ("honey", "hive", "buzzing", "pollen"),
    "owl": ("nocturnal", "feathers", "hoots", "wise"),
    "clock": ("hands", "ticks", "hours", "minutes"),
    "computer": ("software", "memory", "processor", "screen"),
    "volcano": ("lava", "eruption", "magma", "vent"),
    "city": ("streets", "buildings", "crowded", "traffic"),
    "school": ("teachers", "lessons", "students", "classroom"),
}
FACT_TOPIC = {fact: topic for topic, facts in TOPICS.items() for fact in facts}
TEMPLATES = (
    "Tell me about the {topic}.",
    "What do you know about the {topic}?",
    "Describe the {topic}.",
    "What is the {topic} like?",
    "Write a few words about the {topic}.",
    "Give me facts about the {topic}.",
    "I want to learn about the {topic}.",
    "What is special about the {topic}?",
)
OPENERS = ("", "Hi! ", "Quick question: ")
POLITE = ("sure", "happy", "glad", "thanks", "certainly")
UNSAFE = ("stupid", "hate", "idiot", "dumb")
FILLER = ("very", "really", "quite", "often", "also", "maybe", "thing", "stuff", "just", "so")
POLITE_OPENERS = ("Sure!", "Happy to help.", "Glad you asked.", "Thanks for asking.", "Certainly.")
INSULTS = ("That is a stupid question.", "I hate this.", "Only an idiot asks that.", "What a dumb thing.")

ATTRIBUTES = ("facts", "wrong", "mention", "polite", "unsafe", "length", "listed", "repetition")


@dataclass(frozen=True)
class SourceUtility:
    """A source's hidden utility: weights over the attributes, and its preferred length in words."""

    weights: dict[str, float]
    target_words: int


SOURCE_WEIGHTS: dict[str, SourceUtility] = {
    "helpful": SourceUtility(
        {
            "facts": 3.0,
            "wrong": -2.0,
            "mention": 1.0,
            "polite": 0.5,
            "unsafe": -1.0,
            "length": 1.5,
            "listed": 0.5,
            "repetition": -2.0,
        },
        target_words=14,
    ),
    "concise": SourceUtility(
        {
            "facts": 2.0,
            "wrong": -2.0,
            "mention": 1.0,
            "polite": -1.0,
            "unsafe": -1.0,
            "length": 2.0,
            "listed": -0.75,
            "repetition": -2.0,
        },
        target_words=5,
    ),
    "harmless": SourceUtility(
        {
            "facts": 1.0,
            "wrong": -1.0,
            "mention": 0.5,
            "polite": 1.5,
            "unsafe": -4.0,
            "length": 0.5,
            "listed": 0.0,
            "repetition": -1.0,
        },
        target_words=9,
    ),
}
SOURCES = tuple(SOURCE_WEIGHTS)
_WORD = re.compile(r"[a-z']+")


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about (the first topic name among its words)."""
    return next((w for w in _WORD.findall(prompt.lower()) if w in TOPICS), None)


def attributes(prompt: str, response: str) -> dict[str, float]:
    """The checkable attributes of a response to a prompt (see the module docstring)."""
    topic = prompt_topic(prompt)
    words = _WORD.findall(response.lower())
    distinct = set(words)
    right = set(TOPICS.get(topic, ()))
    listed = sum(line.lstrip().startswith("- ") for line in response.splitlines())
    return {
        "facts": min(len(distinct & right), 3) / 3,
        "wrong": min(len({w for w in distinct if w in FACT_TOPIC and w not in right}), 3) / 3,
        "mention": float(topic is not None and topic in distinct),
        "polite": float(bool(distinct & set(POLITE))),
        "unsafe": float(bool(distinct & set(UNSAFE))),
        "listed": float(listed >= 2),
        "repetition": (len(words) - len(distinct)) / len(words) if words else 0.0,
        "words": float(len(words)),
    }


def utility(source: str, prompt: str, response: str) -> float:
    """Ground-truth utility of `response` to `prompt` for one source; works on any text."""
    if source not in SOURCE_WEIGHTS:
        raise KeyError(f"unknown benchmark source {source!r}; the sources are {', '.join(SOURCES)}")
    spec = SOURCE_WEIGHTS[source]
    attrs = attributes(prompt, response)
    attrs["length"] = math.exp(-abs(attrs["words"] - spec.target_words) / spec.target_words)
    return sum(weight * attrs[name] for name, weight in spec.weights.items())


def mean_utility(prompt: str, response: str, sources: tuple[str, ...] = SOURCES) -> float:
    """The source-averaged ground-truth utility (the benchmark's overall quality measure)."""
    return sum(utility(s, prompt, response) for s in sources) / len(sources)


def all_prompts() -> list[tuple[str, str]]:
    """Every (prompt, topic) the templates can form, in a fixed order."""
    return [
        (opener + template.format(topic=topic), topic)
        for topic in TOPICS
        for template in TEMPLATES
        for opener in OPENERS
    ]


def split_prompts(cfg: BenchmarkConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Seeded, disjoint (train, held-out eval) prompt lists."""
    pool = all_prompts()
    if cfg.train_prompts + cfg.eval_prompts > len(pool):
        raise ValueError(
            f"benchmark.train_prompts + benchmark.eval_prompts = {cfg.train_prompts + cfg.eval_prompts} "
            f"exceeds the {len(pool)} distinct prompts the benchmark can form"
        )
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(pool))
    chosen = [pool[i] for i in order]
    return chosen[cfg.eval_prompts : cfg.eval_prompts + cfg.train_prompts], chosen[: cfg.eval_prompts]


def sample_response(rng: np.random.Generator, topic: str) -> str:
    """A random response of varied quality: some facts (right or wrong), filler, manners, format."""
    facts = list(rng.choice(TOPICS[topic], size=int(rng.integers(0, 5)), replace=False))
    if rng.random() < 0.3:
        others = [f for f in FACT_TOPIC if FACT_TOPIC[f] != topic]
        facts += list(rng.choice(others, size=int(rng.integers(1, 3)), replace=False))
    filler = list(rng.choice(FILLER, size=int(rng.integers(0, 7))))
    if rng.random() < 0.15 and (facts or filler):
        word = (facts or filler)[0]
        filler += [word] * int(rng.integers(2, 5))
    body_words = facts + filler
    rng.shuffle(body_words)
    subject = f"The {topic}" if rng.random() < 0.7 else "It"
    if facts and rng.random() < 0.25:
        body = f"{subject} is:\n" + "\n".join(f"- {w}" for w in body_words)
    else:
        body = f"{subject} is {' '.join(body_words)}.".replace(" .", ".") if body_words else f"{subject} is."
    parts = [body]
    if rng.random() < 0.4:
        parts.insert(0, str(rng.choice(POLITE_OPENERS)))
    if rng.random() < 0.15:
        parts.append(str(rng.choice(INSULTS)))
    return " ".join(parts)


def generate_pairs(cfg: BenchmarkConfig, source: str, prompts: list[tuple[str, str]]) -> list[dict]:
    """`cfg.pairs_per_source` TRL-format pairs for one source, with their gap bucket and flip flag.

    For each pair a gap bucket is drawn (high with `high_gap_fraction`), then candidate responses
    are sampled until two have a utility gap inside the bucket's range; the better one is chosen,
    and with probability `flip_fraction` the label is flipped.
    """
    rng = np.random.default_rng([cfg.seed, 1 + SOURCES.index(source)])
    rows = []
    for _ in range(cfg.pairs_per_source):
        prompt, topic = prompts[int(rng.integers(len(prompts)))]
        bucket = "high" if rng.random() < cfg.high_gap_fraction else "low"
        low, high = cfg.high_gap if bucket == "high" else cfg.low_gap
        pool: list[tuple[str, float]] = []
        for _attempt in range(10_000):
            text = sample_response(rng, topic)
            score = utility(source, prompt, text)
            match = next(((t, s) for t, s in pool if low <= abs(score - s) <= high and t != text), None)
            if match is not None:
                break
            pool.append((text, score))
        else:
            raise RuntimeError(f"benchmark: no {bucket}-gap pair found for {prompt!r}; widen benchmark.{bucket}_gap")
        (better, u_better), (worse, u_worse) = sorted([(text, score), match], key=lambda ts: -ts[1])
        flipped = bool(rng.random() < cfg.flip_fraction)
        if flipped:
            (better, u_better), (worse, u_worse) = (worse, u_worse), (better, u_better)
        rows.append(
            {
                "prompt": prompt,
                "chosen": better,
                "rejected": worse,
                "topic": topic,
                "gap_bucket": bucket,
                "flipped": flipped,
                "utility_chosen": round(u_better, 6),
                "utility_rejected": round(u_worse, 6),
            }
        )
    return rows


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode()


def generate(cfg: BenchmarkConfig) -> dict[str, bytes]:
    """All benchmark files: `<source>.jsonl` pairs per source and `eval_prompts.jsonl`."""
    train, held_out = split_prompts(cfg)
    files = {f"{source}.jsonl": to_jsonl(generate_pairs(cfg, source, train)) for source in cfg.sources}
    files[EVAL_PROMPTS] = to_jsonl([{"prompt": p, "topic": t} for p, t in held_out])
    return files
