"""The reward-model scorer (`raybpo.scoring.scorers`' interface): a one-output sequence-classification model."""

from __future__ import annotations

import pyarrow as pa
import torch

from raybpo.models.reward import encode_texts, load_reward_model
from raybpo.scoring.scorers import with_scores

RM_BATCH = 32


class RewardModelScorer:
    """Ray Data actor: candidates -> reward-model scores (one forward per batch of RM_BATCH), on the actor's GPU
    when Ray gave it one."""

    def __init__(self, model: str, max_length: int):
        self.model, self.tokenizer = load_reward_model(model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, responses = batch["prompt"].to_pylist(), batch["response"].to_pylist()
        scores: list[float] = []
        for start in range(0, len(prompts), RM_BATCH):
            encoded = encode_texts(
                self.tokenizer, prompts[start : start + RM_BATCH], responses[start : start + RM_BATCH], self.max_length
            )
            encoded = {name: tensor.to(self.device) for name, tensor in encoded.items()}
            scores += self.model(**encoded).logits[:, 0].float().tolist()
        return with_scores(batch, scores, [""] * len(scores))
