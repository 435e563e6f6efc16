"""Scorers for the `score` stage: each gives a candidate response a scalar (docs/ALGORITHMS.md section 3.2)."""

from raybpo.scoring.judge import JudgeClient, Judgement, parse_score

__all__ = ["JudgeClient", "Judgement", "parse_score"]
