"""The canonical preference-pair schema, its stable id, candidate responses, and the quarantine record.

A pair is (prompt, chosen, rejected) from a named `source`. `prompt` is plain text, or a chat
conversation stored as the JSON text of a list of {"role", "content"} messages (`prompt_messages`
reads it back). Wherever a chat prompt must be plain text (a model without a chat template, a reward
model, a judge) it is rendered one way, as a HH transcript (`plain_prompt`, `plain_response`).
`pair_id` is a content hash of (source, prompt, chosen, rejected): the same pair gets the same id in
every run and on every machine; duplicates within a source share it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("score_chosen", pa.float64()),
        pa.field("score_rejected", pa.float64()),
        pa.field("meta", pa.string()),
    ]
)

# A candidate response of a prompt (the generate stage's output): sampled by the policy with `seed`, or one of the
# prompt's original responses (`origin` chosen or rejected, no seed).
CANDIDATE_SCHEMA = pa.schema(
    [
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("candidate", pa.int32()),
        ("origin", pa.string()),
        ("response", pa.string()),
        ("seed", pa.int64()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("file", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("raw", pa.binary()),
    ]
)


class Reason:
    """Why a row was quarantined (the values written to the quarantine and the manifest)."""

    UNDECODABLE = "undecodable_line"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    NON_STRING = "non_string_field"
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_RESPONSE = "empty_response"
    IDENTICAL = "identical_responses"
    UNSPLITTABLE = "unsplittable_transcript"
    TOO_LONG = "too_long"
    TIE = "tie"
    BAD_LABEL = "bad_label"


class BadRow(ValueError):
    """A row that cannot become a pair; `reason` is one of `Reason`, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_prompt(prompt: str | list[dict[str, Any]]) -> str:
    """Text stays text; chat messages become compact JSON with sorted keys (stable for hashing)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prompt_messages(prompt: str) -> list[dict[str, str]] | None:
    """The chat messages of a stored prompt, or None when it is plain text."""
    if not prompt.startswith("[{"):
        return None
    try:
        messages = json.loads(prompt)
    except json.JSONDecodeError:
        return None
    if all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        return messages
    return None


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SPEAKERS = {"user": HH_HUMAN, "assistant": HH_ASSISTANT}


def _speaker(role: str) -> str:
    return SPEAKERS.get(role, f"\n\n{role.capitalize()}:")


def chat_transcript(messages: list[dict[str, str]]) -> str:
    """Chat messages as a HH transcript: "\n\nHuman: {content}" / "\n\nAssistant: {content}" turns (another
    role as "\n\n{Role}: {content}"), ending with the "\n\nAssistant:" that the response follows."""
    return "".join(f"{_speaker(m['role'])} {m['content']}" for m in messages) + HH_ASSISTANT


def plain_prompt(prompt: str) -> str:
    """A stored prompt as plain text: text as is, a chat conversation as its `chat_transcript`."""
    messages = prompt_messages(prompt)
    return prompt if messages is None else chat_transcript(messages)


def plain_response(prompt: str, response: str) -> str:
    """A response as it follows `plain_prompt(prompt)`: after a chat transcript, with one leading space."""
    return response if prompt_messages(prompt) is None else f" {response}"


def stored_response(prompt: str, text: str) -> str:
    """The inverse of `plain_response`: a text that followed a chat transcript loses its one leading space."""
    return text[1:] if text.startswith(" ") and prompt_messages(prompt) is not None else text


def prompt_key(prompt: str) -> str:
    """Identity of a prompt for deduplication: hash of its lower-cased text with whitespace collapsed."""
    return hashlib.sha256(" ".join(prompt.lower().split()).encode("utf-8")).hexdigest()[:32]


def make_pair_id(source: str, prompt: str, chosen: str, rejected: str) -> str:
    """Stable 128-bit content hash (hex) of a pair; fields are length-prefixed so no two pairs collide."""
    digest = hashlib.sha256()
    for text in (source, prompt, chosen, rejected):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]
