"""The evaluate stage: win-rate maths, variant configs, judged comparisons, and a tiny run end to end.

The run: the session's tests/tiny.yaml run (the benchmark, sft, a depth selection per rule, `train` on bpo's)
copied without its evaluation, and one variant, the graph's stage `train-<name>`, on the depth selection
`random` with DPO overrides; judged by the benchmark's oracle, two samples per held-out prompt.
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raybpo import graph
from raybpo.config import Config, ConfigError, load_config
from raybpo.data import benchmark
from raybpo.data.schema import make_pair_id, prompt_key
from raybpo.data.splits import split_of
from raybpo.metrics.winrates import BASELINE, compare, outcome, summarize, win_rate, winrate_rows
from raybpo.models.reward import load_reward_model, reward_head
from raybpo.report import write_report
from raybpo.rundir import RunDir, StageCounts, StageMissingError, run_stage
from raybpo.scoring.pick import Scorer
from raybpo.scoring.scorers import oracle_batch
from raybpo.stages import evaluate
from raybpo.stages.evaluate import held_out_prompts, judge_setup, run_evaluate

# -- the win rate ---------------------------------------------------------------------------------------------


def test_all_ties_give_one_half_with_no_spread():
    rate = win_rate(0, 10, 0, 0.95)
    assert (rate.win_rate, rate.ci_low, rate.ci_high, rate.comparisons) == (0.5, 0.5, 0.5, 10)


def test_known_counts_give_the_normal_interval_of_the_mean_outcome():
    rate = win_rate(6, 2, 2, 0.95)
    outcomes = np.array([1.0] * 6 + [0.5] * 2 + [0.0] * 2)
    half = 1.959963984540054 * outcomes.std(ddof=1) / math.sqrt(10)
    assert rate.win_rate == pytest.approx(0.7)
    assert (rate.ci_low, rate.ci_high) == pytest.approx((0.7 - half, 0.7 + half))
    assert (rate.ci_low, rate.ci_high) == pytest.approx((0.43867, 0.96133), abs=1e-5)  # by hand: s^2 = 1.6 / 9
    wider, narrower = win_rate(6, 2, 2, 0.99), win_rate(6, 2, 2, 0.8)
    assert wider.ci_low < rate.ci_low < narrower.ci_low and wider.ci_high > rate.ci_high > narrower.ci_high


def test_the_interval_is_clipped_and_degenerate_counts_are_explicit():
    assert win_rate(9, 0, 1, 0.95).ci_high == 1.0 and win_rate(1, 0, 9, 0.95).ci_low == 0.0
    assert (win_rate(10, 0, 0, 0.95).ci_low, win_rate(10, 0, 0, 0.95).ci_high) == (1.0, 1.0)
    one = win_rate(0, 0, 1, 0.95)
    assert (one.win_rate, one.ci_low, one.ci_high) == (0.0, 0.0, 1.0)
    none = win_rate(0, 0, 0, 0.95)
    assert (none.win_rate, none.ci_low, none.ci_high) == (None, None, None)


def test_outcome_counts_equal_scores_and_identical_text_as_ties():
    assert outcome(2.0, 1.0) == 1.0 and outcome(1.0, 2.0) == 0.0 and outcome(1.5, 1.5) == 0.5
    assert outcome(1.0 + 1e-6, 1.0, same_response=True) == 0.5  # the same text: float noise is no preference


# -- variants -------------------------------------------------------------------------------------------------


def test_variants_parse_from_yaml_and_from_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "evaluate:\n  variants:\n    random: {selection: random}\n"
        "    dpo: {overrides: {train.alpha: 0, train.rho: 1}}\n"
    )
    cfg = load_config(path, ["evaluate.variants.ipo.overrides.train.loss=ipo"])
    variants = cfg.evaluate.variants
    assert variants["random"].selection == "random" and variants["random"].overrides == {}
    assert variants["dpo"].overrides == {"train.alpha": 0, "train.rho": 1}
    assert variants["ipo"].overrides == {"train.loss": "ipo"}  # nested by the dotted override, flattened
    dpo = graph.variant_config(cfg, "dpo", variants["dpo"])
    assert (dpo.train.alpha, dpo.train.rho, dpo.train.beta0) == (0.0, 1.0, cfg.train.beta0)
    assert graph.variant_config(cfg, "ipo", variants["ipo"]).train.loss == "ipo" and cfg.train.loss == "dpo"
    assert Config().evaluate.variants == {}  # none by default


def test_bad_variants_fail_with_the_key_named():
    with pytest.raises(ConfigError, match=r"train\.\*, policy\.\* and seed only"):
        load_config(None, ["evaluate.variants={x: {overrides: {ingest.dedup: false}}}"])
    with pytest.raises(ConfigError, match="folder name"):
        load_config(None, ["evaluate.variants={Bad/Name: {}}"])
    with pytest.raises(ConfigError, match="selection"):
        load_config(None, ["evaluate.variants={x: {selection: best}}"])
    cfg = load_config(None, ["evaluate.variants={x: {overrides: {train.alpah: 0}}}"])
    unknown = r"evaluate.variants.x.overrides: 1 invalid setting\(s\)\n  unknown key 'train.alpah'"
    with pytest.raises(ConfigError, match=unknown):
        graph.variant_config(cfg, "x", cfg.evaluate.variants["x"])
    cfg = load_config(None, ["evaluate.variants={x: {overrides: {train.rho: 2}}}"])
    with pytest.raises(ConfigError, match=r"train.rho: Input should be less than or equal to 1"):
        graph.variant_config(cfg, "x", cfg.evaluate.variants["x"])
    with pytest.raises(ConfigError, match=r"evaluate.variants.x.overrides: 1 invalid setting\(s\)\n  train.rho"):
        graph.plan(cfg)  # at planning time, before any stage runs


# -- comparisons ----------------------------------------------------------------------------------------------


def _responses(rows: list[tuple[str, str, int, str, float | None, str]]) -> pa.Table:
    """SCORED-like rows: (origin, prompt, sample, response, score, reason)."""
    return pa.table(
        {
            "prompt_key": [prompt_key(r[1]) for r in rows],
            "prompt": [r[1] for r in rows],
            "candidate": [r[2] for r in rows],
            "origin": [r[0] for r in rows],
            "response": [r[3] for r in rows],
            "score": [r[4] for r in rows],
            "reason": [r[5] for r in rows],
        }
    )


def test_comparisons_are_paired_and_failed_judgements_are_quarantined_not_lost():
    p, q = "Describe the cat.", "Describe the dog."
    responses = _responses(
        [
            (BASELINE, p, 0, "a", 1.0, ""),
            (BASELINE, p, 1, "b", 2.0, ""),
            (BASELINE, q, 0, "c", None, "http_500"),
            ("train", p, 0, "better", 3.0, ""),
            ("train", p, 1, "b", 2.0000001, ""),  # the SFT text itself: a tie
            ("train", q, 0, "d", 5.0, ""),
            ("train-x", p, 0, "worse", 0.0, ""),
            ("train-x", p, 1, "e", None, "unparseable_score: 'x'"),
        ]
    )
    table = compare(responses, ["train", "train-x"], [p, q], samples=2)
    assert table.num_rows == 2 * 2 * 2  # every (policy, prompt, sample), present or not
    rows = {(r["policy"], r["prompt"], r["sample"]): r for r in table.to_pylist()}
    assert rows["train", p, 0]["outcome"] == 1.0 and rows["train", p, 1]["outcome"] == 0.5
    assert rows["train", q, 0]["reason"] == "http_500" and rows["train", q, 0]["outcome"] is None
    assert rows["train", q, 1]["reason"] == "missing_response"
    assert rows["train-x", p, 0]["outcome"] == 0.0 and rows["train-x", p, 1]["reason"].startswith("unparseable")
    summary = summarize(table, "train", 0.95)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["quarantined"]) == (1, 1, 0, 2)
    assert summary["scored"] + summary["quarantined"] == summary["comparisons"] == 4
    assert summary["win_rate"] == 0.75 and summary["mean_score_sft"] == pytest.approx(1.5)


def test_held_out_prompts_without_the_benchmark_are_the_eval_split_minus_training_prompts(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.train.eval_fraction = 0.5
    prompts = [f"Describe the {t}." for t in ("cat", "dog", "sun", "moon", "owl", "bee", "tea", "ship")]
    rows = [(p, f"good {i}", "bad") for p in prompts for i in range(3)]
    ids = [make_pair_id("s", *row) for row in rows]
    split = {p: {split_of(i, 0.5) for i, (q, _, _) in zip(ids, rows, strict=True) if q == p} for p in prompts}
    expected = sorted((p for p in prompts if split[p] == {"eval"}), key=prompt_key)
    assert expected and len(expected) < len(prompts)  # some prompts have pairs in both splits

    def ingested(stage_path: str) -> StageCounts:
        columns = {"pair_id": ids, "prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows]}
        pads.write_dataset(pa.table(columns), f"{stage_path}/pairs", format="parquet")
        return StageCounts(rows_in=len(rows), rows_out=len(rows))

    run_dir = RunDir(cfg.run_dir)
    run_stage(run_dir, "ingest", cfg, ("ingest",), {}, ingested)
    found, source = held_out_prompts(cfg, run_dir)
    assert found == expected and "eval split" in source
    cfg.evaluate.num_prompts = 1
    assert held_out_prompts(cfg, run_dir)[0] == expected[:1]
    cfg.train.eval_fraction = 0.0
    with pytest.raises(ConfigError, match="no held-out prompts"):
        held_out_prompts(cfg, run_dir)


# -- a tiny run -----------------------------------------------------------------------------------------------

TINY = str(Path(__file__).with_name("tiny.yaml"))
SAMPLES = 2  # per held-out prompt and policy


@pytest.fixture(scope="module")
def trained_run(tiny_run, tmp_path_factory):
    """The session's tiny run copied without its evaluation (nor checkpoints and report), to evaluate again."""
    run = tiny_run.copy(tmp_path_factory.mktemp("evaluate") / "run", "evaluate", "report", "checkpoints")
    cfg = load_config(TINY, [f"run_dir={run}"])
    cfg.evaluate = cfg.evaluate.model_copy(
        update={"samples_per_prompt": SAMPLES, "max_new_tokens": 12, "batch_size": 8}
    )
    return cfg


def _eval_prompts(cfg: Config) -> int:
    return len((Path(cfg.run_dir) / "ingest/benchmark/eval_prompts.jsonl").read_text().splitlines())


def _budget(cfg: Config, selection: str) -> tuple[int, int]:
    """(pairs, distinct prompts) of a depth selection's training split, by the split rule itself."""
    table = pads.dataset(Path(cfg.run_dir) / "depth/selections" / selection).to_table(columns=["pair_id", "prompt"])
    rows = [r for r in table.to_pylist() if split_of(r["pair_id"], cfg.train.eval_fraction) == "train"]
    return len(rows), len({prompt_key(r["prompt"]) for r in rows})


def test_evaluate_needs_a_trained_policy(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    with pytest.raises(StageMissingError, match="run `raybpo sft` first"):
        run_evaluate(cfg)  # the tiny policy's SFT model is the baseline
    cfg.policy.model = str(tmp_path / "some-model")
    with pytest.raises(StageMissingError, match=r"train has no finished run .*: run `raybpo train` first"):
        run_evaluate(cfg)


def test_oracle_evaluation_of_the_policy_and_a_variant(trained_run):
    cfg = trained_run.model_copy(deep=True)
    cfg.evaluate.variants = load_config(
        None, ["evaluate.variants={random-dpo: {selection: random, overrides: {train.alpha: 0, train.rho: 1}}}"]
    ).evaluate.variants
    variant_step = graph.step(cfg, "train-random-dpo")  # a stage of the graph, trained before evaluate
    assert variant_step.selection == "random" and not variant_step.run().skipped
    result = run_evaluate(cfg)
    run = Path(cfg.run_dir)
    manifest, evaluation = result.manifest, json.loads((run / "evaluate/evaluation.json").read_text())
    policies = {p["name"]: p for p in evaluation["policies"]}
    prompts = _eval_prompts(cfg)
    assert list(policies) == ["train", "train-random-dpo"] and evaluation["eval_prompts"] == prompts

    # counts reconcile: every (policy, prompt, sample) is a comparison, scored or quarantined
    assert manifest["rows_in"] == 2 * prompts * SAMPLES == manifest["rows_out"] + manifest["rows_quarantined"]
    assert manifest["rows_quarantined"] == 0 and manifest["quarantine_reasons"] == {}
    for p in policies.values():
        assert p["wins"] + p["ties"] + p["losses"] == p["comparisons"] == prompts * SAMPLES and p["quarantined"] == 0
        assert p["win_rate"] == pytest.approx((p["wins"] + p["ties"] / 2) / (prompts * SAMPLES))
        assert 0.0 <= p["ci_low"] <= p["win_rate"] <= p["ci_high"] <= 1.0
    assert manifest["win_rate"] == manifest["final_metrics"]["win_rate"] == policies["train"]["win_rate"]

    # the data budget: the training split of each policy's depth selection, its pairs and distinct prompts
    train = json.loads((run / "train/manifest.json").read_text())
    variant = json.loads((run / "train-random-dpo/manifest.json").read_text())
    assert (policies["train"]["pairs"], policies["train"]["prompts"]) == _budget(cfg, "bpo")
    assert (policies["train-random-dpo"]["pairs"], policies["train-random-dpo"]["prompts"]) == _budget(cfg, "random")
    assert policies["train"]["pairs"] == train["pairs"]["train"]
    assert policies["train-random-dpo"]["pairs"] == variant["pairs"]["train"]
    assert variant["config"]["train"]["alpha"] == 0 and variant["config"]["train"]["rho"] == 1
    assert (policies["train"]["selection"], policies["train-random-dpo"]["selection"]) == ("bpo", "random")
    assert policies["train"]["loss_label"].startswith("beta-DPO") and policies["train-random-dpo"]["loss_label"] == (
        "DPO (beta0=0.1)"
    )

    # paired samples, scored by the oracle: both policies face the same SFT responses
    comparisons = pq.read_table(run / "evaluate/comparisons.parquet").to_pylist()
    by_policy = {name: [r for r in comparisons if r["policy"] == name] for name in policies}
    assert [r["sft_response"] for r in by_policy["train"]] == [r["sft_response"] for r in by_policy["train-random-dpo"]]
    for r in comparisons:
        assert r["score"] == pytest.approx(benchmark.mean_utility(r["prompt"], r["response"]))
        assert r["sft_score"] == pytest.approx(benchmark.mean_utility(r["prompt"], r["sft_response"]))

    # winrates.md shows the JSON's numbers; the report carries the same table
    table = (run / "evaluate/winrates.md").read_text()
    for cells in winrate_rows(evaluation):
        assert "| " + " | ".join(cells) + " |" in table
        assert f"{policies[cells[0]]['win_rate']:.3f}" == cells[5]
    assert (run / "evaluate/winrates.png").stat().st_size > 1000
    md, _ = write_report(cfg.run_dir)
    report = Path(md).read_text()
    assert all(line in report for line in table.splitlines() if line.startswith("| train"))

    # a rerun skips the stage and the variant's training
    again = run_evaluate(cfg)
    assert again.skipped and variant_step.run().skipped
    assert json.loads((run / "train-random-dpo/manifest.json").read_text()) == variant


def test_evaluate_judges_the_variants_it_finds_and_trains_none(trained_run):
    cfg = trained_run.model_copy(deep=True)
    cfg.evaluate.variants = load_config(None, ["evaluate.variants={never-trained: {}}"]).evaluate.variants
    with pytest.raises(StageMissingError, match=r"run `raybpo train --variant never-trained` \(or `raybpo run`\)"):
        run_evaluate(cfg)
    assert not (Path(cfg.run_dir) / "train-never-trained").exists()


def _flaky_oracle(batch: pa.Table) -> pa.Table:
    """The oracle, failing for good on about a third of the responses (by a hash of who answered what, when)."""
    scored = oracle_batch(batch)
    keys = zip(*(batch[c].to_pylist() for c in ("origin", "prompt_key", "candidate")), strict=True)
    bad = [hashlib.sha256(repr(k).encode()).digest()[0] % 3 == 0 for k in keys]
    scores = [None if b else s for b, s in zip(bad, scored["score"].to_pylist(), strict=True)]
    reasons = ["http_503" if b else "" for b in bad]
    scored = scored.set_column(scored.schema.get_field_index("score"), "score", pa.array(scores, pa.float64()))
    return scored.set_column(scored.schema.get_field_index("reason"), "reason", pa.array(reasons))


def test_failed_judgements_are_quarantined_by_the_stage_and_counted(trained_run, monkeypatch):
    cfg = trained_run.model_copy(deep=True)
    monkeypatch.setattr(evaluate, "judge_setup", lambda *_: Scorer(_flaky_oracle, None, "flaky", "flaky oracle"))
    manifest = run_evaluate(cfg).manifest
    run = Path(cfg.run_dir) / "evaluate"
    failed = pq.read_table(run / "quarantine/judgements.parquet").to_pylist()
    comparisons = pq.read_table(run / "comparisons.parquet").to_pylist()
    lost = [c for c in comparisons if c["reason"]]
    assert failed and lost and manifest["judgements_failed"] == len(failed)
    scheduled = _eval_prompts(cfg) * SAMPLES
    assert manifest["rows_in"] == len(comparisons) == scheduled == manifest["rows_out"] + manifest["rows_quarantined"]
    assert manifest["rows_quarantined"] == len(lost) and manifest["quarantine_reasons"] == {"http_503": len(lost)}
    failed_keys = {(f["origin"], f["prompt_key"], f["candidate"]) for f in failed}
    for c in lost:
        assert {("train", c["prompt_key"], c["sample"]), ("sft", c["prompt_key"], c["sample"])} & failed_keys
    policy = json.loads((run / "evaluation.json").read_text())["policies"][0]
    assert policy["quarantined"] == len(lost)
    assert policy["wins"] + policy["ties"] + policy["losses"] == scheduled - len(lost)


def test_reward_model_judge_scores_every_response_alone(trained_run, tmp_path):
    model, tokenizer = load_reward_model(str(Path(trained_run.run_dir) / "sft" / "model"))
    reward_head(model).weight.data.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = trained_run.model_copy(deep=True)
    cfg.evaluate.judge, cfg.evaluate.reward_model = "reward_model", str(tmp_path / "rm")
    judge = judge_setup(cfg, RunDir(cfg.run_dir))
    assert judge.identity.startswith("external:") and judge.label == f"reward model {tmp_path / 'rm'}"
    p = "Describe the cat."
    texts = [(o, p, i, f"The cat is {w}.", None, "") for o in (BASELINE, "train") for i, w in enumerate(["a", "a b"])]
    scored = judge.fn(**judge.args)(_responses(texts).drop_columns(["score", "reason"]))
    scores = scored["score"].to_pylist()
    assert set(scored["reason"].to_pylist()) == {""} and len(set(scores)) == 2 and scores[:2] == scores[2:]
    table = compare(scored, ["train"], [p], samples=2)
    assert [r["outcome"] for r in table.to_pylist()] == [0.5, 0.5]  # the same texts: ties


def _hashed_score(message: str) -> str:
    """The LLM judge's answer: a score from the text's hash, or an unparseable answer for a third."""
    digest = hashlib.sha256(message.encode()).digest()[0]
    return "about seven" if digest % 3 == 0 else str(1 + digest % 10)


def test_llm_judge_failures_are_quarantined_comparisons_with_their_reason(trained_run, judge_server):
    """The judge's scorer as the stage builds it (here in-process; the oracle run covers the Ray path)."""
    with judge_server(_hashed_score) as url:
        cfg = trained_run.model_copy(deep=True)
        cfg.evaluate.judge = "judge"
        cfg.evaluate.llm_judge = cfg.score.judge.model_copy(
            update={"url": url, "max_retries": 0, "requests_per_second": 500}
        )
        judge = judge_setup(cfg, RunDir(cfg.run_dir))
        prompts = [f"Describe the {t}." for t in ("cat", "dog", "sun", "moon")]
        rows = [(o, p, i, f"{o} {p} {i}", None, "") for o in (BASELINE, "train") for p in prompts for i in range(3)]
        scored = judge.fn(**judge.args)(_responses(rows).drop_columns(["score", "reason"]))
    assert judge.identity.startswith("judge:") and judge.label.startswith("LLM judge")
    failed = {(r["origin"], r["prompt"], r["candidate"]) for r in scored.to_pylist() if r["reason"]}
    assert failed and all(r["reason"] == "unparseable_score: 'about seven'" for r in scored.to_pylist() if r["reason"])
    table = compare(scored, ["train"], prompts, samples=3)
    quarantined = [r for r in table.to_pylist() if r["reason"]]
    expected = {(p, i) for o, p, i in failed}  # a failure on either side loses the comparison's outcome
    assert {(r["prompt"], r["sample"]) for r in quarantined} == expected
    summary = summarize(table, "train", 0.95)
    assert summary["scored"] + summary["quarantined"] == 12 and summary["quarantined"] == len(expected)
