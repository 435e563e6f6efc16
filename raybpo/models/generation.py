"""Sampling responses from a causal LM with Hugging Face `generate` (the CPU backend).

Prompts are rendered exactly as in training (`encode_prompt`), left-padded and sampled in batches.
Every prompt gets its own seed stream: batch b of a call is sampled after `torch.manual_seed` of a
value derived from (seed, b), so the same prompts, batch size and seed give the same text.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raybpo.models.tokenize import encode_prompt


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    use_chat_template: bool = True,
) -> list[str]:
    """One sampled response per prompt (greedy when temperature is 0), special tokens removed."""
    model.eval()
    pad = tokenizer.pad_token_id
    responses: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        encoded = [encode_prompt(tokenizer, p, use_chat_template) for p in prompts[start : start + batch_size]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=model.device)
        attention_mask = (torch.arange(width) >= torch.tensor([width - len(ids) for ids in encoded])[:, None]).long()
        torch.manual_seed(seed * 1_000_003 + b)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return responses
