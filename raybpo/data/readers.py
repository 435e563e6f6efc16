"""Format readers: each turns one decoded input row into (prompt, chosen, rejected, scores, meta).

A reader raises `BadRow` with a `Reason` when the row cannot become a pair; `validate_pair` then
applies the checks common to every format (non-empty, distinct, not too long). Keys a reader does
not consume are kept in `meta`, so nothing of a row is lost on the way in.

One-line examples of each format:

    hh             {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!",
                    "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}
                   -> prompt [{"role": "user", "content": "Hi"}], chosen "Hello!", rejected "Go away."
    trl            {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}   (or chat messages, or no prompt)
    pku            {"prompt": "Hi", "response_0": "Hello!", "response_1": "Go away.", "better_response_id": 0}
    ultrafeedback  {"prompt": "Hi", "chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...],
                    "score_chosen": 8.0, "score_rejected": 3.0}
    judge          {"instruction": "Hi", "output_1": "Hello!", "output_2": "Go away.", "preference": 1}
    columns        any row, with a mapping such as {"prompt": "question", "chosen": "good", "rejected": "bad"}
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from raybpo.config import SourceSpec
from raybpo.data.schema import (
    HH_ASSISTANT,
    HH_HUMAN,
    SPEAKERS,
    BadRow,
    Reason,
    canonical_prompt,
    plain_prompt,
    plain_response,
    stored_response,
)

HH_TURN = re.compile(f"({re.escape(HH_HUMAN)}|{re.escape(HH_ASSISTANT)})")
HH_ROLES = {marker: role for role, marker in SPEAKERS.items()}


class ParsedPair(TypedDict):
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float | None
    score_rejected: float | None
    meta: dict[str, Any]


Reader = Callable[[Mapping[str, Any]], ParsedPair]


def _field(row: Mapping[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise BadRow(Reason.MISSING_FIELD, f"no {key!r} field (keys: {sorted(row)})")
    return row[key]


def _text(row: Mapping[str, Any], key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise BadRow(Reason.NON_STRING, f"{key!r} is {type(value).__name__}, expected a string")
    return value


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow(Reason.BAD_LABEL, f"{key!r} is {value!r}, expected a number")
    return float(value)


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A chat conversation: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(value, list) or not value:
        raise BadRow(Reason.NON_STRING, f"{key!r} is {type(value).__name__}, expected a string or chat messages")
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise BadRow(Reason.NON_STRING, f"{key!r} holds {message!r}, not a {{role, content}} message")
        if not isinstance(message.get("content"), str):
            raise BadRow(Reason.NON_STRING, f"{key!r} has a message whose content is not a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _assistant_reply(messages: list[dict[str, str]], key: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow(Reason.UNSPLITTABLE, f"{key!r} must be one assistant message, got {len(messages)} message(s)")
    return messages[0]["content"]


def _rest(row: Mapping[str, Any], *consumed: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in consumed}


def _pair(
    prompt: str | list[dict[str, str]],
    chosen: str,
    rejected: str,
    meta: dict[str, Any],
    score_chosen: float | None = None,
    score_rejected: float | None = None,
) -> ParsedPair:
    return ParsedPair(
        prompt=canonical_prompt(prompt),
        chosen=chosen,
        rejected=rejected,
        score_chosen=score_chosen,
        score_rejected=score_rejected,
        meta=meta,
    )


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts at the last "\\n\\nAssistant:" of their shared dialogue.

    The prompt keeps the whole multi-turn dialogue up to and including that marker, and each
    response is the rest of its transcript (as in the DPO reference implementation). The marker
    is searched in the common prefix, so a response that itself contains the marker is not cut.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow(Reason.UNSPLITTABLE, "the two transcripts share no '\\n\\nAssistant:' turn")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_conversation(prompt: str, chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """The chat form of a split HH row (see `read_hh`), or None when it does not render back exactly."""
    pieces = HH_TURN.split(prompt[: -len(HH_ASSISTANT)])
    if pieces[0] or len(pieces) < 3 or pieces[1] != HH_HUMAN:
        return None
    messages = [{"role": HH_ROLES[m], "content": c.strip()} for m, c in zip(pieces[1::2], pieces[2::2], strict=True)]
    chat = canonical_prompt(messages)
    responses = [stored_response(chat, r) for r in (chosen, rejected)]
    if plain_prompt(chat) != prompt or [plain_response(chat, r) for r in responses] != [chosen, rejected]:
        return None
    return chat, *responses


def read_hh(row: Mapping[str, Any]) -> ParsedPair:
    """Anthropic HH-RLHF: `chosen` and `rejected` full transcripts sharing the dialogue (`split_hh`).

    The prompt becomes a chat conversation, as in TRL's HH scripts: each "\\n\\nHuman:" / "\\n\\nAssistant:"
    turn a user / assistant message with its content stripped; the final empty "\\n\\nAssistant:" is the
    generation prompt, not a message; each response loses its one leading space. That chat form is kept
    only when rendering it back (`plain_prompt`, `plain_response`: the HH transcript, the response after
    one space) reproduces the prompt and both responses byte for byte; otherwise, or when the dialogue
    does not start with "\\n\\nHuman:", the row keeps the transcript text. Either way a base model sees
    the same tokens. (Of the 2,312 rows of harmless-base test, 2,308 take the chat form; the 4 with two
    assistant turns in a row, whose content starts with two spaces, stay text.)
    """
    split = split_hh(_text(row, "chosen"), _text(row, "rejected"))
    prompt, chosen, rejected = hh_conversation(*split) or split
    return _pair(prompt, chosen, rejected, _rest(row, "chosen", "rejected"))


def read_trl(row: Mapping[str, Any]) -> ParsedPair:
    """TRL preference data, standard (strings) or conversational (messages), explicit or implicit prompt.

    Implicit prompt: as TRL's `extract_prompt`, the prompt is the longest common prefix (of text,
    or of whole messages) and each response is the single assistant turn after it.
    """
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    meta = _rest(row, "prompt", "chosen", "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return _pair(prompt, _text(row, "chosen"), _text(row, "rejected"), meta)
        messages = _messages(prompt, "prompt")
        return _pair(
            messages,
            _assistant_reply(_messages(chosen, "chosen"), "chosen"),
            _assistant_reply(_messages(rejected, "rejected"), "rejected"),
            meta,
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = len(shared.rstrip()) if len(shared) < min(len(chosen), len(rejected)) else len(shared)
        if cut == 0:
            raise BadRow(Reason.UNSPLITTABLE, "no prompt field and no shared prefix to take the prompt from")
        return _pair(chosen[:cut], chosen[cut:], rejected[cut:], meta)
    chosen_msgs, rejected_msgs = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared_len = 0
    while (
        shared_len < min(len(chosen_msgs), len(rejected_msgs)) - 1
        and chosen_msgs[shared_len] == rejected_msgs[shared_len]
    ):
        shared_len += 1
    if shared_len == 0:
        raise BadRow(Reason.UNSPLITTABLE, "no prompt field and the conversations share no leading messages")
    return _pair(
        chosen_msgs[:shared_len],
        _assistant_reply(chosen_msgs[shared_len:], "chosen"),
        _assistant_reply(rejected_msgs[shared_len:], "rejected"),
        meta,
    )


def read_pku(row: Mapping[str, Any], preference: str = "better") -> ParsedPair:
    """PKU-SafeRLHF: `response_0`/`response_1`, the winner named by better_ or safer_response_id."""
    key = f"{preference}_response_id"
    winner = _field(row, key)
    if isinstance(winner, bool) or winner not in (0, 1):
        raise BadRow(Reason.BAD_LABEL, f"{key!r} is {winner!r}, expected 0 or 1")
    responses = (_text(row, "response_0"), _text(row, "response_1"))
    meta = _rest(row, "prompt", "response_0", "response_1")
    return _pair(_text(row, "prompt"), responses[int(winner)], responses[1 - int(winner)], meta)


def read_ultrafeedback(row: Mapping[str, Any]) -> ParsedPair:
    """UltraFeedback binarized: chosen/rejected are [user, assistant] chats, with their scores."""
    chosen_msgs, rejected_msgs = (
        _messages(_field(row, "chosen"), "chosen"),
        _messages(_field(row, "rejected"), "rejected"),
    )
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        prompt = chosen_msgs[:-1]
    meta = _rest(row, "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "messages")
    return _pair(
        prompt,
        _assistant_reply(chosen_msgs[-1:], "chosen"),
        _assistant_reply(rejected_msgs[-1:], "rejected"),
        meta,
        _number(row, "score_chosen"),
        _number(row, "score_rejected"),
    )


JUDGE_TIES = (0, 1.5, 3)


def read_judge(row: Mapping[str, Any]) -> ParsedPair:
    """Pairwise judge annotations (AlpacaFarm style): `preference` 1 or 2 names the better output.

    A tie (0, 1.5 or 3) carries no preference and is quarantined as `tie`. An `input` field, when
    present and non-empty, is appended to the instruction.
    """
    preference = _field(row, "preference")
    if preference in JUDGE_TIES and not isinstance(preference, bool):
        raise BadRow(Reason.TIE, f"preference is {preference!r}, a tie")
    if isinstance(preference, bool) or preference not in (1, 2):
        raise BadRow(Reason.BAD_LABEL, f"preference is {preference!r}, expected 1 or 2")
    outputs = (_text(row, "output_1"), _text(row, "output_2"))
    prompt = _text(row, "instruction")
    extra_input = row.get("input")
    if isinstance(extra_input, str) and extra_input.strip():
        prompt = f"{prompt}\n\n{extra_input}"
    meta = _rest(row, "instruction", "input", "output_1", "output_2")
    return _pair(prompt, outputs[int(preference) - 1], outputs[2 - int(preference)], meta)


def read_columns(row: Mapping[str, Any], columns: Mapping[str, str]) -> ParsedPair:
    """Any flat row: `columns` maps prompt, chosen, rejected (and optionally score_chosen/_rejected)."""
    prompt_value = _field(row, columns["prompt"])
    prompt = prompt_value if isinstance(prompt_value, str) else _messages(prompt_value, columns["prompt"])
    scores = {k: _number(row, columns[k]) if k in columns else None for k in ("score_chosen", "score_rejected")}
    return _pair(
        prompt,
        _text(row, columns["chosen"]),
        _text(row, columns["rejected"]),
        _rest(row, *columns.values()),
        **scores,
    )


def reader_for(spec: SourceSpec, fmt: str) -> Reader:
    """The reader of a (detected) format, with the source's options bound."""
    readers: dict[str, Reader] = {
        "hh": read_hh,
        "trl": read_trl,
        "pku": functools.partial(read_pku, preference=spec.pku_preference),
        "ultrafeedback": read_ultrafeedback,
        "judge": read_judge,
        "columns": functools.partial(read_columns, columns=spec.columns or {}),
    }
    return readers[fmt]


def validate_pair(pair: ParsedPair, max_chars: int) -> ParsedPair:
    """Checks every format shares: non-empty prompt and responses, distinct responses, length limit."""
    if not pair["prompt"].strip():
        raise BadRow(Reason.EMPTY_PROMPT, "the prompt is empty or whitespace")
    for key in ("chosen", "rejected"):
        if not pair[key].strip():
            raise BadRow(Reason.EMPTY_RESPONSE, f"the {key} response is empty or whitespace")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise BadRow(Reason.IDENTICAL, "chosen and rejected are the same text")
    total = len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])
    if total > max_chars:
        raise BadRow(Reason.TOO_LONG, f"{total} characters, more than ingest.max_chars={max_chars}")
    return pair


def detect_format(rows: list[Mapping[str, Any]]) -> str | None:
    """The format the sample rows' keys say, or None when none fits or two formats fit.

    Rows that fit no format (broken rows, quarantined later) do not vote.
    """
    votes = {_format_of(row) for row in rows} - {None}
    return votes.pop() if len(votes) == 1 else None


def _format_of(row: Mapping[str, Any]) -> str | None:
    keys = set(row)
    if {"instruction", "output_1", "output_2", "preference"} <= keys:
        return "judge"
    if {"prompt", "response_0", "response_1"} <= keys and keys & {"better_response_id", "safer_response_id"}:
        return "pku"
    if {"chosen", "rejected", "score_chosen", "score_rejected"} <= keys and isinstance(row["chosen"], list):
        return "ultrafeedback"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "trl"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return "hh"
        return "trl"
    return None
