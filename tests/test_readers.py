"""Each reader on hand-written rows and on the real HH rows; every quarantine reason via `parse_records`."""

import json

import pyarrow as pa
import pytest

from raybpo.config import SourceSpec
from raybpo.data.readers import (
    detect_format,
    read_columns,
    read_hh,
    read_judge,
    read_pku,
    read_trl,
    read_ultrafeedback,
    validate_pair,
)
from raybpo.data.schema import BadRow, Reason, plain_prompt, plain_response, prompt_messages
from raybpo.stages.ingest import RECORD_SCHEMA, parse_records

HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}


def test_hh_splits_at_the_last_assistant_turn_and_keeps_the_dialogue():
    row = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
        "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad",
    }
    pair = read_hh(row)
    assert prompt_messages(pair["prompt"]) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert (pair["chosen"], pair["rejected"]) == ("good", "bad")
    assert plain_prompt(pair["prompt"]) == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert plain_response(pair["prompt"], pair["chosen"]) == " good"


def test_hh_marker_inside_a_response_is_not_a_split_point():
    row = {
        "chosen": "\n\nHuman: q\n\nAssistant: one\n\nAssistant: two",
        "rejected": "\n\nHuman: q\n\nAssistant: other",
    }
    pair = read_hh(row)
    assert prompt_messages(pair["prompt"]) == [{"role": "user", "content": "q"}]
    assert pair["chosen"] == "one\n\nAssistant: two"


@pytest.mark.parametrize(
    "prompt",
    [
        "\n\nHuman:  two spaces\n\nAssistant:",  # stripped content would not render back
        "\n\nHuman: a \n\nAssistant:",
        "\n\nHuman:no space\n\nAssistant:",
        "\n\nAssistant: hi\n\nHuman: a\n\nAssistant:",  # does not start with a Human turn
        "Preamble\n\nHuman: a\n\nAssistant:",
    ],
)
def test_hh_keeps_text_when_the_chat_form_would_not_render_back(prompt):
    pair = read_hh({"chosen": prompt + " good", "rejected": prompt + " bad"})
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (prompt, " good", " bad")


def test_hh_keeps_text_when_a_response_lacks_its_leading_space():
    pair = read_hh({"chosen": "\n\nHuman: a\n\nAssistant:good", "rejected": "\n\nHuman: a\n\nAssistant: bad"})
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("\n\nHuman: a\n\nAssistant:", "good", " bad")


def test_hh_real_rows_split_by_hand(hh_lines):
    first = read_hh(json.loads(hh_lines[0]))
    messages = prompt_messages(first["prompt"])
    assert messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert messages[-1] == {"role": "user", "content": "okay some of these do not have anything to do with pens"}
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
    assert first["chosen"] == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    )
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    second = read_hh(json.loads(hh_lines[1]))
    assert [m["role"] for m in prompt_messages(second["prompt"])].count("user") == 3
    assert second["rejected"] == (
        "I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel when you don’t drink alcohol?"
    )
    assert detect_format([json.loads(line) for line in hh_lines[:20]]) == "hh"


def test_hh_real_rows_render_back_exactly_and_mostly_as_chat(hh_lines):
    forms = {"chat": 0, "text": 0}
    for line in hh_lines:
        row = json.loads(line)
        pair = read_hh(row)
        forms["text" if prompt_messages(pair["prompt"]) is None else "chat"] += 1
        prompt = plain_prompt(pair["prompt"])
        assert prompt + plain_response(pair["prompt"], pair["chosen"]) == row["chosen"]
        assert prompt + plain_response(pair["prompt"], pair["rejected"]) == row["rejected"]
    assert forms == {"chat": 2308, "text": 4}


def test_trl_standard_explicit_and_implicit():
    explicit = read_trl({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 7})
    assert (explicit["prompt"], explicit["chosen"], explicit["rejected"]) == ("The sky is", " blue.", " green.")
    assert explicit["meta"] == {"id": 7}
    implicit = read_trl({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert (implicit["prompt"], implicit["chosen"], implicit["rejected"]) == ("The sky is", " blue.", " green.")


def test_trl_conversational_explicit_and_implicit():
    user = [{"role": "user", "content": "What color is the sky?"}]
    explicit = read_trl(
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    )
    assert prompt_messages(explicit["prompt"]) == user and explicit["chosen"] == "Blue."
    implicit = read_trl(
        {
            "chosen": [*user, {"role": "assistant", "content": "Blue."}],
            "rejected": [*user, {"role": "assistant", "content": "Green."}],
        }
    )
    assert prompt_messages(implicit["prompt"]) == user and implicit["rejected"] == "Green."


def test_pku_better_or_safer():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0}
    assert (read_pku(row)["chosen"], read_pku(row)["rejected"]) == ("b", "a")
    assert read_pku(row, preference="safer")["chosen"] == "a"
    with pytest.raises(BadRow) as bad:
        read_pku({**row, "better_response_id": 2})
    assert bad.value.reason == Reason.BAD_LABEL


def test_ultrafeedback_binarized():
    row = {
        "prompt": "Hi",
        "prompt_id": "x",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}],
        "messages": [],
        "score_chosen": 8.0,
        "score_rejected": 3,
    }
    pair = read_ultrafeedback(row)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("Hi", "Hello!", "Bye.")
    assert (pair["score_chosen"], pair["score_rejected"]) == (8.0, 3.0)
    assert pair["meta"] == {"prompt_id": "x"}
    assert detect_format([row]) == "ultrafeedback"


def test_judge_annotations_and_ties():
    row = {"instruction": "Sum", "input": "2+2", "output_1": "4", "output_2": "5", "preference": 1}
    pair = read_judge(row)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("Sum\n\n2+2", "4", "5")
    assert read_judge({**row, "preference": 2})["chosen"] == "5"
    for tie in (0, 1.5):
        with pytest.raises(BadRow) as bad:
            read_judge({**row, "preference": tie})
        assert bad.value.reason == Reason.TIE
    with pytest.raises(BadRow) as bad:
        read_judge({**row, "preference": "first"})
    assert bad.value.reason == Reason.BAD_LABEL


def test_generic_columns():
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": "s"}
    pair = read_columns({"q": "Q", "good": "G", "bad": "B", "s": 1, "extra": True}, mapping)
    assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["score_chosen"]) == ("Q", "G", "B", 1.0)
    assert pair["meta"] == {"extra": True}


def test_format_detection():
    assert detect_format([HH]) == "hh"
    assert detect_format([{"prompt": "a", "chosen": "b", "rejected": "c"}]) == "trl"
    assert detect_format([{"prompt": "a", "response_0": "b", "response_1": "c", "safer_response_id": 0}]) == "pku"
    assert detect_format([{"instruction": "a", "output_1": "b", "output_2": "c", "preference": 1}]) == "judge"
    assert detect_format([{"question": "a"}]) is None
    assert detect_format([{"question": "a"}, {"prompt": "a", "chosen": "b", "rejected": "c"}]) == "trl"
    assert detect_format([HH, {"instruction": "a", "output_1": "b", "output_2": "c", "preference": 1}]) is None


def _records(raws: list[bytes], fmt: str = "hh") -> pa.Table:
    n = len(raws)
    return pa.table(
        {"source": ["s"] * n, "format": [fmt] * n, "file": ["f.jsonl"] * n, "row": list(range(1, n + 1)), "raw": raws},
        schema=RECORD_SCHEMA,
    )


BROKEN = {
    Reason.UNDECODABLE: b'{"chosen": "\\n\\nHuman: x',
    Reason.NOT_AN_OBJECT: b'["a list"]',
    Reason.MISSING_FIELD: b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"}',
    Reason.NON_STRING: b'{"chosen": 3, "rejected": "x"}',
    Reason.EMPTY_RESPONSE: json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": HH["rejected"]}).encode(),
    Reason.IDENTICAL: json.dumps({"chosen": HH["chosen"], "rejected": HH["chosen"]}).encode(),
    Reason.UNSPLITTABLE: json.dumps({"chosen": "Hello", "rejected": "Bye"}).encode(),
    Reason.TOO_LONG: json.dumps({"chosen": HH["chosen"] + "x" * 500, "rejected": HH["rejected"]}).encode(),
}


@pytest.mark.parametrize("reason", sorted(BROKEN))
def test_each_quarantine_reason(reason):
    out = parse_records(_records([BROKEN[reason]]), {"s": SourceSpec(path="f.jsonl")}, max_chars=400).to_pylist()[0]
    assert out["reason"] == reason, out["detail"]
    assert out["raw"] == BROKEN[reason] and out["row"] == 1 and out["pair_id"] is None


def test_invalid_utf8_and_empty_prompt_are_quarantined():
    out = parse_records(
        _records([b'{"chosen": "\xff"}', b'{"prompt": " ", "chosen": "a", "rejected": "b"}'], fmt="trl"),
        {"s": SourceSpec(path="f.jsonl")},
        max_chars=400,
    ).to_pylist()
    assert [o["reason"] for o in out] == [Reason.UNDECODABLE, Reason.EMPTY_PROMPT]
    assert "not UTF-8" in out[0]["detail"]


def test_good_rows_become_pairs_with_origin():
    out = parse_records(_records([json.dumps(HH).encode()]), {"s": SourceSpec(path="f.jsonl")}, 400).to_pylist()[0]
    assert out["reason"] == "" and out["raw"] is None and out["chosen"] == "Hello!"
    assert json.loads(out["meta"]) == {"origin": "f.jsonl:1"}


def test_validate_pair_limits_length():
    pair = read_hh(HH)
    assert validate_pair(pair, max_chars=1000) is pair
    with pytest.raises(BadRow, match=r"more than ingest\.max_chars=10"):
        validate_pair(pair, max_chars=10)
