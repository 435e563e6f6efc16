"""The ingest stage on a local Ray (2 CPUs): real HH rows, broken rows, dedup, manifests, formats, CLI."""

import hashlib
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raybpo.cli import main
from raybpo.config import Config, SourceSpec, load_config
from raybpo.data.export import export_trl
from raybpo.data.readers import read_hh, read_trl
from raybpo.data.schema import Reason, make_pair_id, prompt_messages
from raybpo.stages.ingest import IngestError, ingest, resolve_source

GOOD = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(12)]
BROKEN_LINES = [
    b'{"prompt": "cut off',  # undecodable_line
    b"42",  # not_an_object
    b'{"prompt": "p", "chosen": "c"}',  # missing_field
    b'{"prompt": "p", "chosen": 1, "rejected": "r"}',  # non_string_field
    b'{"prompt": "", "chosen": "c", "rejected": "r"}',  # empty_prompt
    b'{"prompt": "p", "chosen": "  ", "rejected": "r"}',  # empty_response
    b'{"prompt": "p", "chosen": "same", "rejected": "same"}',  # identical_responses
    b'{"prompt": "p", "chosen": "' + b"x" * 300 + b'", "rejected": "r"}',  # too_long
]


def _config(tmp_path, *sources: SourceSpec, **ingest) -> Config:
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.ingest.sources = list(sources)
    for key, value in ingest.items():
        setattr(cfg.ingest, key, value)
    return cfg


def _table(run_dir: str, folder: str) -> pa.Table:
    return pads.dataset(f"{run_dir}/ingest/{folder}", format="parquet").to_table()


def _mixed_file(tmp_path):
    lines = [json.dumps(row).encode() for row in GOOD]
    lines.insert(3, lines[0])  # a duplicate
    lines[5:5] = BROKEN_LINES
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines[:8]) + b"\n\n   \n" + b"\n".join(lines[8:]) + b"\n")
    return path


def test_real_hh_rows_reconcile_and_rerun_skips(ray_session, tmp_path, hh_path, hh_lines):
    cfg = _config(tmp_path, SourceSpec(path=str(hh_path)))
    result = ingest(cfg)
    m = result.manifest
    assert not result.skipped
    assert m["rows_in"] == len(hh_lines) == 2312
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"] + m["duplicates_removed"]
    assert m["sources"] == {"hh-rlhf-harmless-base-test": {"format": "hh", "inputs": [str(hh_path)]}}
    assert m["input_hashes"] == {
        f"hh-rlhf-harmless-base-test:{hh_path}": hashlib.sha256(hh_path.read_bytes()).hexdigest()
    }
    assert m["config"]["ingest"]["sources"][0]["path"] == str(hh_path)
    assert {"ray", "torch", "pyarrow", "python"} <= m["versions"].keys() and m["wall_time_s"] > 0

    pairs, quarantine = _table(cfg.run_dir, "pairs"), _table(cfg.run_dir, "quarantine")
    assert pairs.num_rows == m["rows_out"] and quarantine.num_rows == m["rows_quarantined"]
    assert sum(m["quarantine_reasons"].values()) == m["rows_quarantined"]
    assert len(set(pairs["pair_id"].to_pylist())) == pairs.num_rows
    first = read_hh(json.loads(hh_lines[0]))
    row = pairs.filter(pa.compute.equal(pairs["prompt"], first["prompt"])).to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in row] == [(first["chosen"], first["rejected"])]
    assert json.loads(row[0]["meta"])["origin"] == f"{hh_path}:1"
    assert (m["rows_out"], m["quarantine_reasons"]) == (2308, {"empty_response": 4})
    chat = [prompt_messages(p) is not None for p in pairs["prompt"].to_pylist()]
    assert (chat.count(True), chat.count(False)) == (2304, 4)

    exported = tmp_path / "hh.trl.jsonl"
    assert export_trl(f"{cfg.run_dir}/ingest/pairs", str(exported)) == pairs.num_rows
    source = "hh-rlhf-harmless-base-test"
    back = [read_trl(json.loads(line)) for line in exported.read_text().splitlines()]
    back_ids = [make_pair_id(source, b["prompt"], b["chosen"], b["rejected"]) for b in back]
    assert sorted(back_ids) == sorted(pairs["pair_id"].to_pylist())

    again = ingest(cfg)
    assert again.skipped and again.manifest == m

    changed = ingest(
        cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"max_chars": 500, "max_bad_fraction": 1.0})})
    )
    assert not changed.skipped and changed.manifest["quarantine_reasons"]["too_long"] > 0


def test_half_finished_stage_is_redone_from_scratch(ray_session, tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in GOOD))
    cfg = _config(tmp_path, SourceSpec(path=str(source)))
    first = ingest(cfg).manifest
    stage = tmp_path / "run" / "ingest"
    (stage / "manifest.json").unlink()
    (stage / "pairs" / "stale.parquet").write_bytes(b"left by a crashed run")
    redone = ingest(cfg)
    assert not redone.skipped and redone.manifest["rows_out"] == first["rows_out"] == 12
    assert not (stage / "pairs" / "stale.parquet").exists()
    assert _table(cfg.run_dir, "pairs").num_rows == 12


def test_mixed_good_and_broken_lines(ray_session, tmp_path):
    path = _mixed_file(tmp_path)
    cfg = _config(tmp_path, SourceSpec(path=str(path), name="mixed"), max_chars=200, max_bad_fraction=1.0)
    m = ingest(cfg).manifest
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"], m["duplicates_removed"]) == (21, 12, 8, 1)
    assert m["quarantine_reasons"] == {
        reason: 1
        for reason in (
            Reason.UNDECODABLE,
            Reason.NOT_AN_OBJECT,
            Reason.MISSING_FIELD,
            Reason.NON_STRING,
            Reason.EMPTY_PROMPT,
            Reason.EMPTY_RESPONSE,
            Reason.IDENTICAL,
            Reason.TOO_LONG,
        )
    }
    assert m["quarantine_by_file"] == {str(path): m["quarantine_reasons"]}
    bad = {r["reason"]: r for r in _table(cfg.run_dir, "quarantine").to_pylist()}
    assert bad[Reason.UNDECODABLE]["raw"] == BROKEN_LINES[0]
    assert bad[Reason.UNDECODABLE]["row"] == 6 and bad[Reason.UNDECODABLE]["file"] == str(path)
    assert bad[Reason.TOO_LONG]["row"] == 15  # numbered as in the file: blank lines 9 and 10 count
    assert all(r["source"] == "mixed" and r["detail"] for r in bad.values())
    pairs = _table(cfg.run_dir, "pairs").to_pylist()
    assert sorted(p["chosen"] for p in pairs) == sorted(row["chosen"] for row in GOOD)
    kept = next(p for p in pairs if p["chosen"] == "Good answer 0.")
    assert json.loads(kept["meta"])["origin"] == f"{path}:1"  # the first of the duplicates is kept


def test_too_many_bad_rows_fail_loudly(ray_session, tmp_path):
    path = _mixed_file(tmp_path)
    cfg = _config(tmp_path, SourceSpec(path=str(path)), max_chars=200, max_bad_fraction=0.1)
    with pytest.raises(IngestError) as err:
        ingest(cfg)
    assert str(path) in str(err.value) and "8 of 21 rows are bad" in str(err.value)
    assert "top reasons:" in str(err.value) and "undecodable_line (1)" in str(err.value)
    assert not (tmp_path / "run" / "ingest" / "manifest.json").exists()
    assert _table(cfg.run_dir, "quarantine").num_rows == 8


def test_parquet_folder_judge_jsonl_and_a_uri_run_dir(ray_session, tmp_path):
    folder = tmp_path / "pku"
    folder.mkdir()
    rows = [
        {
            "prompt": f"p{i}",
            "response_0": f"a{i}",
            "response_1": f"b{i}",
            "better_response_id": i % 2,
            "safer_response_id": 0,
        }
        for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "part-1.parquet")
    judge = tmp_path / "judge.jsonl.gz"
    import gzip

    judge.write_bytes(
        gzip.compress(
            b"".join(
                json.dumps({"instruction": f"i{k}", "output_1": "x", "output_2": "y", "preference": p}).encode() + b"\n"
                for k, p in enumerate([1, 2, 1.5, 1])
            )
        )
    )
    cfg = Config(run_dir=f"file://{tmp_path}/uri-run")
    cfg.ingest.max_bad_fraction = 0.5
    cfg.ingest.sources = [
        SourceSpec(path=str(folder), pku_preference="safer"),
        SourceSpec(path=str(judge), name="judged"),
    ]
    m = ingest(cfg).manifest
    assert m["sources"]["pku"]["format"] == "pku" and m["sources"]["judged"]["format"] == "judge"
    assert (m["rows_in"], m["rows_out"], m["quarantine_reasons"]) == (10, 9, {"tie": 1})
    pairs = pads.dataset(f"{tmp_path}/uri-run/ingest/pairs").to_table().to_pylist()
    pku = {p["prompt"]: p["chosen"] for p in pairs if p["source"] == "pku"}
    assert pku == {f"p{i}": f"a{i}" for i in range(6)}  # safer_response_id = 0
    origins = {json.loads(p["meta"])["origin"] for p in pairs if p["source"] == "pku"}
    assert f"{folder}/part-1.parquet:3" in origins


def test_unknown_format_and_missing_inputs_are_clear_errors(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(
        IngestError, match=r"cannot tell the format of .*odd.jsonl from its keys \['answer', 'question'\]"
    ):
        resolve_source(SourceSpec(path=str(odd)))
    with pytest.raises(IngestError, match="no such file or folder"):
        resolve_source(SourceSpec(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(IngestError, match="needs a network"):
        resolve_source(SourceSpec(path="no-such-org/no-such-dataset"))


def test_cli_ingest_export_and_errors(ray_session, tmp_path, capsys):
    run_dir = tmp_path / "demo"
    args = ["--run-dir", str(run_dir), "benchmark.pairs_per_source=50", "benchmark.eval_prompts=8"]
    assert main(["ingest", "--preset", "benchmark", *args]) == 0
    out = capsys.readouterr().out
    assert "rows in 150, out 150, quarantined 0" in out and f"{run_dir}/ingest/pairs/" in out
    assert len((run_dir / "ingest" / "benchmark" / "eval_prompts.jsonl").read_text().splitlines()) == 8
    manifest = json.loads((run_dir / "ingest" / "manifest.json").read_text())
    assert manifest["config"]["benchmark"]["pairs_per_source"] == 50
    assert set(manifest["sources"]) == {"helpful", "concise", "harmless"}

    exported = tmp_path / "pairs.trl.jsonl"
    assert main(["export", str(run_dir / "ingest" / "pairs"), str(exported)]) == 0
    back = [read_trl(json.loads(line)) for line in exported.read_text().splitlines()]
    pairs = _table(str(run_dir), "pairs").to_pylist()
    assert sorted((b["prompt"], b["chosen"], b["rejected"]) for b in back) == sorted(
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs
    )

    assert main(["depth", "--run-dir", str(run_dir)]) == 2
    assert "has no finished run (no readable manifest.json): run `raybpo score` first" in capsys.readouterr().err
    assert main(["ingest", "--preset", "benchmark", "train.betaa=1"]) == 2
    assert "unknown key 'train.betaa'" in capsys.readouterr().err
    assert main(["ingest", "--source", "x.jsonl,fmt=hh"]) == 2
    assert "bad option 'fmt=hh'" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in (
        "run",
        "demo",
        "ingest",
        "reward",
        "sft",
        "breadth",
        "generate",
        "score",
        "depth",
        "train",
        "tune",
        "evaluate",
        "report",
        "export",
    ):
        assert command in out


def test_source_strings_parse_into_specs():
    from raybpo.cli import parse_source

    spec = parse_source("data/x.parquet,format=columns,name=mine,prompt=q,chosen=good,rejected=bad")
    assert (spec.path, spec.format, spec.name) == ("data/x.parquet", "columns", "mine")
    assert spec.columns == {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert load_config(None, ["ingest.preset=benchmark"]).ingest.preset == "benchmark"
