"""Depth candidates: seeded generation (HF backend; the vLLM backend's processor up to the engine),
scoring (oracle, reward model) and the pair rules."""

import asyncio
import copy
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray
from conftest import benchmark_with_tiny_llama

from raybpo.artifacts import read_pairs
from raybpo.config import Config, GenerateConfig, JudgeConfig, TinyModelConfig
from raybpo.data.schema import prompt_key
from raybpo.models.generation import sample_seed
from raybpo.models.loading import load_tokenizer
from raybpo.models.reward import load_reward_model, reward_head
from raybpo.models.tokenize import encode_prompt
from raybpo.rundir import RunDir, StageCounts, run_stage
from raybpo.scoring.pick import make_scorer
from raybpo.scoring.reward_model import RewardModelScorer
from raybpo.stages.generate import run_generate, vllm_processor, vllm_request_dataset, vllm_requests
from raybpo.stages.score import all_pairs, run_score, uniform_pairs

KEPT = 6


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory) -> Config:
    """A run with the benchmark ingested, a tiny policy, and a breadth selection of KEPT prompts."""
    tiny = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64)
    cfg, cfg.policy.model = benchmark_with_tiny_llama(tmp_path_factory.mktemp("gen-a"), tiny, pairs_per_source=40)
    cfg.generate = GenerateConfig(n=4, max_new_tokens=8, batch_size=16)
    prompts = sorted(set(read_pairs(RunDir(cfg.run_dir))["prompt"]))[:KEPT]

    def breadth(stage_path: str) -> StageCounts:  # a hand-made selection stands in for the breadth stage
        table = pa.table({"prompt": prompts, "prompt_key": [prompt_key(p) for p in prompts], "kept": [True] * KEPT})
        pads.write_dataset(table, f"{stage_path}/prompts", format="parquet")
        return StageCounts(rows_in=KEPT, rows_out=KEPT)

    run_stage(RunDir(cfg.run_dir), "breadth", cfg, ("breadth",), {}, breadth)
    return cfg


def _copy(cfg: Config, run_dir: Path, **update) -> Config:
    """`cfg` with `update`, in a run dir of its own holding copies of its ingest and breadth stages (no more)."""
    for stage in ("ingest", "breadth"):
        shutil.copytree(Path(cfg.run_dir) / stage, run_dir / stage)
    return cfg.model_copy(update={"run_dir": str(run_dir), **update})


def _candidates(cfg: Config) -> list[dict]:
    table = pads.dataset(f"{cfg.run_dir}/generate/candidates").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["prompt_key"], r["candidate"]))


@pytest.fixture(scope="module")
def generated(prepared):
    return prepared, run_generate(prepared).manifest


def test_generation_gives_n_seeded_samples_per_prompt_plus_the_originals(generated):
    cfg, manifest = generated
    rows = _candidates(cfg)
    sampled = [r for r in rows if r["origin"] == "policy"]
    assert len(sampled) == KEPT * 4 == manifest["sampled"]
    assert manifest["rows_out"] == len(rows) == manifest["sampled"] + manifest["originals"]
    for key in {r["prompt_key"] for r in rows}:
        mine = [r for r in rows if r["prompt_key"] == key]
        assert [r["candidate"] for r in mine if r["origin"] == "policy"] == [0, 1, 2, 3]
        assert all(r["seed"] == sample_seed(0, key, r["candidate"]) for r in mine if r["origin"] == "policy")
        originals = [r for r in mine if r["origin"] != "policy"]
        assert originals and {r["origin"] for r in originals} <= {"chosen", "rejected"}
        assert [r["candidate"] for r in originals] == list(range(4, 4 + len(originals)))


def test_generation_is_reproducible_by_seed_whatever_the_batching(prepared, generated, tmp_path):
    cfg, _ = generated
    again = _copy(prepared, tmp_path / "b", generate=prepared.generate.model_copy(update={"batch_size": 5}))
    run_generate(again)
    assert _candidates(again) == _candidates(cfg)
    other = _copy(prepared, tmp_path / "c", seed=1)
    run_generate(other)
    assert [r["response"] for r in _candidates(other)] != [r["response"] for r in _candidates(cfg)]


def test_oracle_scores_and_uniform_pairs(generated):
    cfg, _ = generated
    manifest = run_score(cfg.model_copy(update={"score": cfg.score.model_copy(update={"scorer": "oracle"})})).manifest
    assert manifest["labelled"].startswith("oracle") and manifest["rows_quarantined"] == 0
    assert manifest["rows_in"] == manifest["rows_out"] == len(_candidates(cfg))
    pairs = pads.dataset(f"{cfg.run_dir}/score/candidate_pairs").to_table().to_pylist()
    assert pairs and manifest["pairs"] == len(pairs)
    assert all(p["score_chosen"] > p["score_rejected"] and p["source"] == "bpo:oracle" for p in pairs)
    per_prompt = {}
    for p in pairs:
        per_prompt[p["prompt"]] = per_prompt.get(p["prompt"], 0) + 1
    assert max(per_prompt.values()) <= (4 + 2) // 2 + 1  # uniform: at most half the candidates per prompt


def test_pair_rules_on_hand_made_scores():
    scores = [0.5, 3.0, 1.0, 2.0, 2.5, 0.0]  # ranks: 1 (3.0), 4 (2.5), 3 (2.0), 2 (1.0), 0 (0.5), 5 (0.0)
    assert uniform_pairs(scores, min_gap=0.0) == [(1, 5), (4, 0), (3, 2)]
    assert uniform_pairs(scores, min_gap=1.5) == [(1, 5), (4, 0)]  # 2.0 vs 1.0 is below the gap
    assert uniform_pairs([1.0, 1.0], min_gap=0.0) == []  # a tie is no preference
    assert uniform_pairs([1.0, 2.0, 3.0], min_gap=0.0) == [(2, 0)]  # odd count: the median is left out
    assert sorted(all_pairs([1.0, 2.0, 4.0], min_gap=1.5)) == [(2, 0), (2, 1)]
    assert len(all_pairs(scores, min_gap=0.0)) == 15


def test_reward_model_scoring_is_batch_invariant(generated, tmp_path):
    cfg, _ = generated
    model, tokenizer = load_reward_model(cfg.policy.model)
    reward_head(model).weight.data.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rows = _candidates(cfg)[:10]
    table = pa.Table.from_pylist(rows)
    scorer = RewardModelScorer(str(tmp_path / "rm"), max_length=64)
    together = scorer(table)["score"].to_pylist()
    alone = [scorer(table.slice(i, 1))["score"].to_pylist()[0] for i in range(len(rows))]
    assert together == pytest.approx(alone, abs=1e-5) and len(set(together)) > 1
    assert scorer.device.type == "cpu"  # no GPU given: the model runs where Ray placed the actor
    judge = JudgeConfig()
    assert make_scorer("reward_model", judge, str(tmp_path / "rm"), "rm", 64, num_gpus=1).num_gpus == 1
    assert make_scorer("judge", judge, None, "", 64, num_gpus=1).num_gpus == 0  # an HTTP client needs none


def test_vllm_backend_builds_its_processor_and_seeded_requests(prepared):
    cfg = prepared
    gen = GenerateConfig(backend="vllm", n=3, engine_kwargs={"max_model_len": 512}, concurrency=2, batch_size=8)
    processor = vllm_processor(cfg.policy.model, gen)
    assert processor.config.model_source == cfg.policy.model and processor.config.concurrency == 2
    assert processor.config.engine_kwargs["max_model_len"] == 512 and processor.config.batch_size == 8
    row = {"prompt": "Describe the cat.", "prompt_key": "k"}
    requests = vllm_requests(row, [1, 5, 9], plain=True, seed=7, cfg=gen)
    assert [r["candidate"] for r in requests] == [0, 1, 2]
    assert [r["sampling_params"]["seed"] for r in requests] == [sample_seed(7, "k", i) for i in range(3)]
    assert [r["seed"] for r in requests] == [r["sampling_params"]["seed"] for r in requests]
    assert requests[0]["tokenized_prompt"] == [1, 5, 9] and "messages" not in requests[0]
    assert requests[0]["sampling_params"]["max_tokens"] == gen.max_new_tokens


def test_vllm_engine_gets_the_hf_backends_token_ids(prepared, monkeypatch):
    """The rows the vLLM engine stage reads carry `encode_prompt`'s ids (one BOS, no chat template for the
    tiny model), not what Ray's own tokenize stage would send; the processor has no chat-template or tokenize
    stage; the engine's request holds exactly those ids; a result becomes the candidate row."""
    from ray.data.llm import Processor
    from ray.llm._internal.batch.constants import vLLMTaskType
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper

    cfg = prepared
    gen = GenerateConfig(backend="vllm", n=2, max_new_tokens=8, batch_size=4)
    processor = vllm_processor(cfg.policy.model, gen)
    assert processor.list_stage_names() == ["vLLMEngineStage", "DetokenizeStage"]

    chat = json.dumps([{"role": "user", "content": "Describe the cat."}])
    prompts = [*sorted(set(read_pairs(RunDir(cfg.run_dir))["prompt"]))[:3], chat]
    source = ray.data.from_items([{"prompt": p, "prompt_key": prompt_key(p)} for p in prompts])
    requests = vllm_request_dataset(source, cfg.policy.model, cfg.policy, gen, cfg.seed)
    # What `Processor.__call__` does before its first stage, the engine here: the stage reads the data column.
    engine_rows = [r[Processor.DATA_COLUMN] for r in requests.map(processor.preprocess).take_all()]
    engine_rows.sort(key=lambda r: (prompts.index(r["prompt"]), r["candidate"]))

    tokenizer = load_tokenizer(cfg.policy.model, cfg.policy)
    expected = {p: encode_prompt(tokenizer, p) for p in prompts}
    assert [(r["prompt"], r["candidate"]) for r in engine_rows] == [(p, i) for p in prompts for i in range(2)]
    for row in engine_rows:
        assert list(row["tokenized_prompt"]) == expected[row["prompt"]]
        assert (
            row["seed"] == row["sampling_params"]["seed"] == sample_seed(cfg.seed, row["prompt_key"], row["candidate"])
        )
    ids = list(engine_rows[0]["tokenized_prompt"])
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert ids != tokenizer(prompts[0])["input_ids"]  # Ray's TokenizeStage: no BOS from this tokenizer

    # The engine's request, built by Ray's own code (a stand-in `vllm` module: SamplingParams as a dict).
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))
    engine = object.__new__(vLLMEngineWrapper)  # the engine itself needs vLLM and a GPU
    engine.request_id, engine.idx_in_batch_column, engine.task_type = 0, "idx", vLLMTaskType.GENERATE
    row = copy.deepcopy(engine_rows[-1])
    request = asyncio.run(engine._prepare_llm_request({**row, "idx": 0}))
    assert request.prompt_token_ids == expected[chat] and request.prompt == chat
    assert request.params["seed"] == row["seed"] and request.params["max_tokens"] == 8

    # After the engine (it echoes `prompt`, consumes `sampling_params`) and Ray's detokenize stage.
    result = {k: v for k, v in row.items() if k not in ("tokenized_prompt", "sampling_params")}
    candidate = processor.postprocess({Processor.DATA_COLUMN: {**result, "generated_text": " It purrs."}})
    assert candidate == {
        "prompt_key": prompt_key(chat),
        "prompt": chat,
        "candidate": 1,
        "origin": "policy",
        "response": "It purrs.",  # after a plain chat transcript, as `sample_seeded` stores it
        "seed": row["seed"],
    }


def _seven_unless_a_list(message: str) -> str:
    """The LLM judge's answer: 7 for most answers, a non-numeric reply for list answers."""
    return "Score: seven" if "\n- " in message else "7"


def test_judge_scores_and_quarantines_unparseable_judgements(generated, judge_server):
    cfg, _ = generated
    with judge_server(_seven_unless_a_list) as url:
        judge = cfg.score.judge.model_copy(update={"url": url, "max_retries": 1, "requests_per_second": 200})
        score = cfg.score.model_copy(update={"scorer": "judge", "judge": judge})
        manifest = run_score(cfg.model_copy(update={"score": score})).manifest
    listed = [r for r in _candidates(cfg) if "\n- " in r["response"]]
    assert listed, "the benchmark's original responses include list answers"
    assert manifest["rows_quarantined"] == len(listed)
    assert manifest["quarantine_reasons"] == {"unparseable_score: 'Score: seven'": len(listed)}
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_quarantined"] == len(_candidates(cfg))
    quarantined = pads.dataset(f"{cfg.run_dir}/score/quarantine").to_table().to_pylist()
    assert sorted(q["response"] for q in quarantined) == sorted(r["response"] for r in listed)
    scored = pads.dataset(f"{cfg.run_dir}/score/scored").to_table()
    assert set(scored["score"].to_pylist()) == {7.0} and manifest["pairs"] == 0  # all ties: no preference


def test_the_oracle_and_judge_scorers_import_no_model_library():
    """A Ray worker unpickling `JudgeScorer` imports its module only: no torch, no transformers."""
    code = "import sys, raybpo.scoring.scorers; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
