"""Export a pairs folder to TRL's preference JSONL (standard, or conversational for chat prompts)."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from raybpo.data.schema import prompt_messages


def trl_row(pair: dict) -> dict:
    """A canonical pair as a TRL explicit-prompt row; chat prompts give the conversational format."""
    messages = prompt_messages(pair["prompt"])
    if messages is None:
        return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def export_trl(pairs_uri: str, out_uri: str) -> int:
    """Write every pair under `pairs_uri` (a Parquet folder, local or URI) to `out_uri`; returns the count."""
    dataset = pads.dataset(pairs_uri, format="parquet")
    out_fs, out_path = pafs.FileSystem.from_uri(out_uri) if "://" in out_uri else (pafs.LocalFileSystem(), out_uri)
    count = 0
    with out_fs.open_output_stream(out_path) as out:
        for batch in dataset.to_batches(columns=["prompt", "chosen", "rejected"]):
            for pair in batch.to_pylist():
                out.write((json.dumps(trl_row(pair), ensure_ascii=False) + "\n").encode())
                count += 1
    return count
