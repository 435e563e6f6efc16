"""Sampling responses from a causal LM on CPU or GPU, reproducible per (prompt, sample index).

`sample_seeded` draws every row with its own `torch.Generator`, so a response depends only on the
model, its prompt and its seed: not on the batch it was sampled in, the batch size, the worker or a
rerun. Prompts are rendered exactly as in training (`prompt_token_ids`: `encode_prompt`'s ids, with
`max_prompt_length` only their last ones, as training truncates; the vLLM backend sends the engine these
same ids), left-padded, each distinct prompt prefilled once, and decoded with the KV cache; a row stops at
EOS or after `max_new_tokens`. Sample i of a prompt is drawn with the seed `sample_seed(seed, prompt_key, i)`.

The Ray Data actors that sample with it, each loading its model once:
- `HfGenerator`: prompts -> `generate.n` seeded samples each, rows of `CANDIDATE_SCHEMA` (origin `policy`):
  the generate stage's `hf` backend;
- `PolicySampler`: rows (policy, model, prompt, prompt_key) -> `HfGenerator`'s samples of each policy's model,
  `origin` naming the policy: the evaluate stage's samples, the same seeds for every policy.
`sample_responses` is a plain-function convenience: one response per prompt, the seeds derived from (seed,
prompt text, prompt position).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raybpo.config import GenerateConfig, PolicyConfig
from raybpo.data.schema import CANDIDATE_SCHEMA, stored_response
from raybpo.models.loading import load_causal_lm
from raybpo.models.tokenize import encode_prompt, uses_chat_template


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of sample `index` of the prompt identified by `key` (a stable 63-bit hash)."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose probability reaches `top_p` (nucleus)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
) -> list[int]:
    """The token ids a prompt is sampled from (both backends): `encode_prompt`'s, only the last
    `max_prompt_length` of them when that is set (as training truncates)."""
    ids = encode_prompt(tokenizer, prompt, use_chat_template)
    return ids if max_prompt_length is None else ids[-max_prompt_length:]


@torch.no_grad()
def sample_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
) -> list[list[int]]:
    """The sampled token ids of one response per (prompt, seed), without EOS; temperature 0 is greedy.

    Rows that share a prompt (the `n` samples of one prompt) share its prefill: each distinct prompt is
    encoded once and its KV cache copied to its rows (the cache's `reorder_cache`, as beam search does); the
    prefill computes the logits of the last position only (`logits_to_keep=1`).
    """
    model.eval()
    device = model.device
    encoded = [prompt_token_ids(tokenizer, p, use_chat_template, max_prompt_length) for p in prompts]
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor([distinct.setdefault(tuple(ids), len(distinct)) for ids in encoded], device=device)
    width = max(map(len, distinct))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in distinct], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in distinct], device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    prefill = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    past = prefill.past_key_values
    past.reorder_cache(row_prompt)
    logits = prefill.logits[:, -1].float().cpu()[row_prompt.cpu()]
    attention, positions = attention[row_prompt], positions[row_prompt, -1:]
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out = torch.full((len(prompts), max_new_tokens), pad, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for t in range(max_new_tokens):
        if temperature == 0:
            tokens = logits.argmax(-1)
        else:
            probs = _filter_top_p(torch.softmax(logits / temperature, dim=-1), top_p)
            tokens = torch.stack(
                [torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)]
            )
        tokens = torch.where(done, torch.tensor(pad), tokens)
        out[:, t] = tokens
        done |= tokens == eos
        if done.all() or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions + 1
        result = model(
            input_ids=tokens[:, None].to(device),
            attention_mask=attention,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past, logits = result.past_key_values, result.logits[:, -1].float().cpu()
    return [[i for i in row.tolist() if i not in (pad, eos)] for row in out]


def sample_seeded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
) -> list[str]:
    """One response text per (prompt, seed), special tokens removed (see `sample_token_ids`); after a chat
    prompt rendered as plain HH transcript, without the one leading space `render_response` adds back."""
    ids = sample_token_ids(
        model, tokenizer, prompts, seeds, max_new_tokens, temperature, top_p, use_chat_template, max_prompt_length
    )
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if uses_chat_template(tokenizer, use_chat_template):
        return texts
    return [stored_response(p, t) for p, t in zip(prompts, texts, strict=True)]


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
    """One response per prompt, the seed of prompt i derived from (seed, prompt text, i)."""
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [sample_seed(seed, p, start + i) for i, p in enumerate(batch)]
        responses += sample_seeded(
            model, tokenizer, batch, seeds, max_new_tokens, temperature, top_p, use_chat_template
        )
    return responses


class HfGenerator:
    """Ray Data actor: prompts (prompt, prompt_key) -> `n` seeded samples each, from a model loaded once."""

    def __init__(self, model: str, policy: dict, generate: dict, seed: int):
        self.policy = PolicyConfig.model_validate(policy)
        self.cfg = GenerateConfig.model_validate(generate)
        self.seed = seed
        self.model, self.tokenizer = load_causal_lm(model, self.policy)
        if self.cfg.num_gpus > 0:
            self.model.to("cuda")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [
            (p, k, i)
            for p, k in zip(batch["prompt"].to_pylist(), batch["prompt_key"].to_pylist(), strict=True)
            for i in range(self.cfg.n)
        ]
        seeds = [sample_seed(self.seed, k, i) for _, k, i in rows]
        texts = sample_seeded(
            self.model,
            self.tokenizer,
            [p for p, _, _ in rows],
            seeds,
            self.cfg.max_new_tokens,
            self.cfg.temperature,
            self.cfg.top_p,
            self.policy.use_chat_template,
            self.cfg.max_prompt_length,
        )
        return pa.table(
            {
                "prompt_key": [k for _, k, _ in rows],
                "prompt": [p for p, _, _ in rows],
                "candidate": [i for _, _, i in rows],
                "origin": ["policy"] * len(rows),
                "response": texts,
                "seed": seeds,
            },
            schema=CANDIDATE_SCHEMA,
        )


class PolicySampler:
    """Ray Data actor: rows (policy, model, prompt, prompt_key) -> `HfGenerator`'s seeded samples of each.

    One model is held at a time; the rows come in one block per policy, so an actor loads each model about once.
    The `origin` column names the policy that wrote the response.
    """

    def __init__(self, policy: dict, generate: dict, seed: int):
        self.args = (policy, generate, seed)
        self.loaded: tuple[str, HfGenerator] | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for name, model in dict.fromkeys(zip(batch["policy"].to_pylist(), batch["model"].to_pylist(), strict=True)):
            if self.loaded is None or self.loaded[0] != model:
                self.loaded = (model, HfGenerator(model, *self.args))
            samples = self.loaded[1](batch.filter(pc.equal(batch["policy"], name)))
            index = samples.schema.get_field_index("origin")
            out.append(samples.set_column(index, "origin", pa.array([name] * samples.num_rows, pa.string())))
        return pa.concat_tables(out)
