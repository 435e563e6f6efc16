"""Turn (prompt, response) text into token ids with the prompt masked, as training and scoring need.

The prompt is rendered with the tokenizer's chat template when it has one (a text prompt becomes one
user turn; a stored chat conversation is used as is), else as plain text after BOS (`plain_prompt`: a
chat conversation as its HH transcript, its responses after one space, `render_response`). The
response is tokenised on its own and ends with EOS, so the prompt/response boundary never merges
tokens. Truncation follows TRL: when prompt + the longer response exceed `max_length`, the prompt is
cut to its LAST `max_prompt_length` tokens, then responses are cut to fit; a response of which no
token fits is an error, never a silent empty sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from raybpo.data.schema import plain_prompt, plain_response, prompt_messages


class TokenizationError(ValueError):
    """A row cannot be tokenised within the length limits; the message says why."""


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a shared prompt and its two responses (responses end with EOS)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (asked for, and it has one)."""
    return use_chat_template and bool(tokenizer.chat_template)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool = True) -> str:
    """The prompt text the model sees, ending where the response starts."""
    if not uses_chat_template(tokenizer, use_chat_template):
        return plain_prompt(prompt)
    messages = prompt_messages(prompt) or [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, use_chat_template: bool = True
) -> str:
    """The response text the model sees after `render_prompt` (after a plain chat transcript: one space first)."""
    return response if uses_chat_template(tokenizer, use_chat_template) else plain_response(prompt, response)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool = True) -> list[int]:
    ids = tokenizer(render_prompt(tokenizer, prompt, use_chat_template), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def truncate(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int):
    """Keep the end of the prompt, then cut responses to fit `max_length`; error if a response vanishes."""
    if len(prompt) + max(map(len, responses)) > max_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    if room <= 0:
        raise TokenizationError(
            f"nothing of the response fits: the prompt keeps {len(prompt)} tokens (max_prompt_length="
            f"{max_prompt_length}) of max_length={max_length}"
        )
    return prompt, [r[:room] for r in responses]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    chosen: str,
    rejected: str,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool = True,
) -> EncodedPair:
    prompt_ids, (chosen_ids, rejected_ids) = truncate(
        encode_prompt(tokenizer, prompt, use_chat_template),
        [
            encode_response(tokenizer, render_response(tokenizer, prompt, r, use_chat_template))
            for r in (chosen, rejected)
        ],
        max_length,
        max_prompt_length,
    )
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids)


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool = True,
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one supervised example, truncated as `encode_pair`."""
    prompt_ids, (response_ids,) = truncate(
        encode_prompt(tokenizer, prompt, use_chat_template),
        [encode_response(tokenizer, render_response(tokenizer, prompt, response, use_chat_template))],
        max_length,
        max_prompt_length,
    )
    return prompt_ids, response_ids
