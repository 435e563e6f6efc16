"""Scorers for the score and evaluate stages: each gives a candidate response a scalar (docs/ALGORITHMS.md 3.2).

`scorers` (the interface, the oracle and the LLM-judge actor; no model library), `reward_model` (the
reward-model actor), `pick` (the scorer a stage names, run over a dataset), `judge` (the OpenAI-compatible judge
client)."""

from raybpo.scoring.judge import JudgeClient, Judgement, parse_score

__all__ = ["JudgeClient", "Judgement", "parse_score"]
