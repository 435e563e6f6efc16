"""Ingest stage (Ray Data): parse every source into canonical pairs, validate, quarantine, deduplicate.

    files / HF dataset -> records (source, file, row, raw bytes) -> parse + validate -> dedup -> pairs/
                                                                \\-> bad rows with a reason -> quarantine/

Nothing is dropped silently: `rows_in == rows_out + rows_quarantined + duplicates_removed`, all four
in the manifest, with the quarantine counts by reason and per file. Blank lines of a JSONL file are
not rows. A file with more than `ingest.max_bad_fraction` bad rows fails the stage, naming the file
and its top reasons (its quarantine is still written, for inspection).
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from raybpo.artifacts import INGEST, INGEST_QUARANTINE, INGESTED_PAIRS, benchmark_file, in_stage, relpath
from raybpo.cluster import init_ray
from raybpo.config import Config, SourceSpec
from raybpo.data import benchmark
from raybpo.data.readers import detect_format, reader_for, validate_pair
from raybpo.data.schema import PAIR_SCHEMA, QUARANTINE_SCHEMA, BadRow, Reason, make_pair_id
from raybpo.rundir import NO_CONTEXT, RunDir, StageContext, StageCounts, StageResult, hash_files, run_stage

log = logging.getLogger(__name__)

STAGE = INGEST
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
HF_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
DETECT_ROWS = 20
ROWS_PER_FILE = 250_000
ROWS_PER_SHUFFLE_PARTITION = 100_000
RECORD_SCHEMA = pa.schema(
    [("source", pa.string()), ("format", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("raw", pa.binary())]
)
PARSED_SCHEMA = pa.schema(list(PAIR_SCHEMA) + [f for f in QUARANTINE_SCHEMA if f.name not in PAIR_SCHEMA.names])


class IngestError(RuntimeError):
    """The ingest stage cannot go on; the message names the source and the reason."""


@dataclass(frozen=True)
class ResolvedSource:
    """A source spec with its format decided and its files listed (or a Hugging Face dataset)."""

    spec: SourceSpec
    name: str
    format: str
    fs: pafs.FileSystem | None
    files: tuple[str, ...]

    @property
    def is_hf(self) -> bool:
        return self.fs is None


# --------------------------------------------------------------------------- reading records


def _split_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(1-based line number, line) of every non-blank line."""
    return [(i, line) for i, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


def _rows_to_raw(rows: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(row, ensure_ascii=False, default=str).encode() for row in rows]


def _file_records(item: dict[str, Any], source: str, fmt: str) -> list[dict[str, Any]]:
    """flat_map: one file's bytes -> a record per line (JSONL) or per row (Parquet)."""
    path, data = item["path"], item["bytes"]
    if path.endswith(".parquet"):
        raws = _rows_to_raw(pq.read_table(pa.BufferReader(data)).to_pylist())
        numbered = list(enumerate(raws, start=1))
    else:
        numbered = _split_lines(data)
    return [{"source": source, "format": fmt, "file": path, "row": n, "raw": raw} for n, raw in numbered]


def _table_records(batch: pa.Table, source: str, fmt: str, name: str) -> pa.Table:
    """map_batches over a Hugging Face table (with a `__row__` column) -> records."""
    rows = batch.drop_columns(["__row__"]).to_pylist()
    return pa.table(
        {
            "source": [source] * len(rows),
            "format": [fmt] * len(rows),
            "file": [name] * len(rows),
            "row": batch["__row__"],
            "raw": _rows_to_raw(rows),
        },
        schema=RECORD_SCHEMA,
    )


def _load_hf(spec: SourceSpec) -> pa.Table:
    try:
        import datasets
    except ImportError as err:
        raise IngestError(
            f"source {spec.path!r} looks like a Hugging Face dataset name, but `datasets` is not installed: "
            "pip install 'raybpo[hf]'"
        ) from err
    try:
        dataset = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as err:
        raise IngestError(
            f"cannot load the Hugging Face dataset {spec.path!r} (subset {spec.subset}, split {spec.split!r}): "
            f"{type(err).__name__}: {err}. Loading a dataset by name needs a network (or a filled HF cache); "
            "otherwise pass a local JSONL, JSONL.gz or Parquet file."
        ) from err
    table = dataset.with_format("arrow")[:]
    return table.append_column("__row__", pa.array(range(1, table.num_rows + 1), pa.int64()))


def _sample_rows(fs: pafs.FileSystem, path: str) -> list[dict[str, Any]]:
    """The first decodable object rows of a file, for format detection."""
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            return next(parquet.iter_batches(batch_size=DETECT_ROWS)).to_pylist() if parquet.metadata.num_rows else []
    compression = "gzip" if path.endswith(".gz") else None
    rows: list[dict[str, Any]] = []
    with fs.open_input_stream(path, compression=compression) as handle:
        for line in handle.read(1 << 20).split(b"\n")[:-1]:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) >= DETECT_ROWS:
                break
    return rows


def resolve_source(spec: SourceSpec) -> ResolvedSource:
    """List a source's files (a file, or a folder's data files) or recognise a dataset name; fix its format."""
    if "://" in spec.path:
        fs, path = pafs.FileSystem.from_uri(spec.path)
    else:
        fs, path = pafs.LocalFileSystem(), posixpath.abspath(spec.path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if "://" not in spec.path and HF_NAME.match(spec.path) and not spec.path.endswith(FILE_SUFFIXES):
            return _resolve_hf(spec)
        raise IngestError(f"source {spec.path!r}: no such file or folder")
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = tuple(sorted(i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(FILE_SUFFIXES)))
        if not files:
            raise IngestError(f"source {spec.path!r}: a folder with no {', '.join(FILE_SUFFIXES)} files")
    elif path.endswith(FILE_SUFFIXES):
        files = (path,)
    else:
        raise IngestError(f"source {spec.path!r}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}")
    name = spec.name or re.sub(r"(\.jsonl|\.json|\.parquet)?(\.gz)?$", "", posixpath.basename(path.rstrip("/")))
    fmt = spec.format if spec.format != "auto" else _detect(spec, _sample_rows(fs, files[0]), files[0])
    return ResolvedSource(spec, name, fmt, fs, files)


def _resolve_hf(spec: SourceSpec) -> ResolvedSource:
    name = spec.name or spec.path.rsplit("/", 1)[-1]
    fmt = spec.format
    if fmt == "auto":
        fmt = _detect(spec, _load_hf(spec).slice(0, DETECT_ROWS).drop_columns(["__row__"]).to_pylist(), spec.path)
    return ResolvedSource(spec, name, fmt, None, ())


def _detect(spec: SourceSpec, rows: list[dict[str, Any]], where: str) -> str:
    fmt = detect_format(rows)
    if fmt is None:
        keys = sorted({k for row in rows for k in row})
        raise IngestError(
            f"source {spec.path!r}: cannot tell the format of {where} from its keys {keys}; "
            "name it, e.g. --source PATH,format=hh (formats: hh, trl, pku, ultrafeedback, judge, columns)"
        )
    return fmt


def read_records(source: ResolvedSource) -> ray.data.Dataset:
    """A Ray Dataset of this source's raw records (RECORD_SCHEMA)."""
    if source.is_hf:
        return ray.data.from_arrow(_load_hf(source.spec)).map_batches(
            functools.partial(_table_records, source=source.name, fmt=source.format, name=source.spec.path),
            batch_format="pyarrow",
        )
    files = ray.data.read_binary_files(list(source.files), filesystem=source.fs, include_paths=True)
    return files.flat_map(functools.partial(_file_records, source=source.name, fmt=source.format))


# --------------------------------------------------------------------------- parsing


def parse_records(batch: pa.Table, sources: dict[str, SourceSpec], max_chars: int) -> pa.Table:
    """map_batches: records -> PARSED_SCHEMA rows, a pair (reason "") or a quarantined row (raw kept)."""
    out: dict[str, list[Any]] = {name: [] for name in PARSED_SCHEMA.names}
    for record in batch.to_pylist():
        values: dict[str, Any] = {"source": record["source"], "file": record["file"], "row": record["row"]}
        try:
            pair = validate_pair(_decode(record, sources[record["source"]]), max_chars)
        except BadRow as bad:
            values.update(reason=bad.reason, detail=bad.detail, raw=record["raw"])
        else:
            meta = {**pair["meta"], "origin": f"{record['file']}:{record['row']}"}
            values.update(
                pair_id=make_pair_id(record["source"], pair["prompt"], pair["chosen"], pair["rejected"]),
                prompt=pair["prompt"],
                chosen=pair["chosen"],
                rejected=pair["rejected"],
                score_chosen=pair["score_chosen"],
                score_rejected=pair["score_rejected"],
                meta=json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str),
                reason="",
            )
        for name in out:
            out[name].append(values.get(name))
    return pa.table(out, schema=PARSED_SCHEMA)


def _decode(record: dict[str, Any], spec: SourceSpec):
    try:
        row = json.loads(record["raw"].decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRow(Reason.UNDECODABLE, f"not UTF-8: {err.reason} at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise BadRow(Reason.UNDECODABLE, f"not JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(row, dict):
        raise BadRow(Reason.NOT_AN_OBJECT, f"a JSON {type(row).__name__}, expected an object")
    return reader_for(spec, record["format"])(row)


def _select(batch: pa.Table, bad: bool, columns: list[str]) -> pa.Table:
    is_bad = pc.not_equal(batch["reason"], "")
    return batch.filter(is_bad if bad else pc.invert(is_bad)).select(columns)


def _count_rows(batch: pa.Table) -> pa.Table:
    """map_batches: rows per (file, reason) of one batch; the driver sums these few counts (no shuffle)."""
    return batch.group_by(["file", "reason"]).aggregate([([], "count_all")])


def _first_of_group(group: pa.Table) -> pa.Table:
    """map_groups: keep the earliest (file, row) of a set of identical pairs."""
    return group.sort_by([("file", "ascending"), ("row", "ascending")]).slice(0, 1)


# --------------------------------------------------------------------------- the stage


def _write_benchmark(cfg: Config, run_dir: RunDir) -> list[SourceSpec]:
    """Generate the built-in benchmark into `ingest/benchmark/`; its pair files become TRL sources."""
    specs = []
    for filename, data in benchmark.generate(cfg.benchmark).items():
        run_dir.write_bytes(relpath(benchmark_file(filename)), data)
        if filename != benchmark.EVAL_PROMPTS:
            uri = run_dir.uri_of(*benchmark_file(filename))
            specs.append(SourceSpec(path=uri, format="trl", name=filename.removesuffix(".jsonl")))
    return specs


def _input_hashes(cfg: Config, sources: list[ResolvedSource]) -> dict[str, str]:
    hashes = {}
    if cfg.ingest.preset == "benchmark":
        hashes["benchmark"] = f"generator-v{benchmark.GENERATOR_VERSION}"
    for source in sources:
        if source.is_hf:
            spec = source.spec
            hashes[f"{source.name}:{spec.path}"] = f"hf:{spec.path}:{spec.subset}:{spec.split}"
        else:
            for path in source.files:
                hashes[f"{source.name}:{path}"] = hash_files(source.fs, path)
    return hashes


def ingest(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """Run the ingest stage into `<run_dir>/ingest/` (skipped when its manifest is up to date)."""
    if not cfg.ingest.sources and cfg.ingest.preset == "none":
        raise IngestError("nothing to ingest: give --source PATH (repeatable) or --preset benchmark")
    user_sources = [resolve_source(spec) for spec in cfg.ingest.sources]
    run_dir = RunDir(cfg.run_dir)
    sections = ("ingest", "benchmark") if cfg.ingest.preset == "benchmark" else ("ingest",)

    def body(stage_path: str) -> StageCounts:
        sources = list(user_sources)
        if cfg.ingest.preset == "benchmark":
            sources += [resolve_source(spec) for spec in _write_benchmark(cfg, run_dir)]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            raise IngestError(f"two inputs share the source name(s) {dupes}: give each a name=...")
        return _ingest_sources(cfg, sources, run_dir)

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, sections, _input_hashes(cfg, user_sources), body)


def _ingest_sources(cfg: Config, sources: list[ResolvedSource], run_dir: RunDir) -> StageCounts:
    records = read_records(sources[0])
    for source in sources[1:]:
        records = records.union(read_records(source))
    specs = {s.name: s.spec for s in sources}
    parsed = records.map_batches(
        functools.partial(parse_records, sources=specs, max_chars=cfg.ingest.max_chars), batch_format="pyarrow"
    ).materialize()

    partitions = max(1, min(200, -(-parsed.count() // ROWS_PER_SHUFFLE_PARTITION)))
    by_file: dict[str, Counter[str]] = {}
    for item in parsed.map_batches(_count_rows, batch_format="pyarrow").take_all():
        by_file.setdefault(item["file"], Counter())[item["reason"]] += item["count_all"]
    rows_in = sum(sum(c.values()) for c in by_file.values())
    reasons: Counter[str] = Counter()
    for counts in by_file.values():
        reasons.update({r: n for r, n in counts.items() if r})
    rows_quarantined = sum(reasons.values())

    if rows_quarantined:
        parsed.map_batches(
            functools.partial(_select, bad=True, columns=QUARANTINE_SCHEMA.names), batch_format="pyarrow"
        ).write_parquet(run_dir.path(*INGEST_QUARANTINE), filesystem=run_dir.fs, min_rows_per_file=ROWS_PER_FILE)
    _check_bad_share(by_file, cfg.ingest.max_bad_fraction, run_dir.path(*INGEST_QUARANTINE))

    good = parsed.map_batches(
        functools.partial(_select, bad=False, columns=[*PAIR_SCHEMA.names, "file", "row"]), batch_format="pyarrow"
    )
    rows_good = rows_in - rows_quarantined
    if cfg.ingest.dedup:
        if partitions == 1:  # hash shuffle starts aggregator actors, seconds of fixed cost for one partition
            good.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        good = good.groupby("pair_id", num_partitions=partitions).map_groups(_first_of_group, batch_format="pyarrow")
    pairs = good.map_batches(lambda t: t.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA), batch_format="pyarrow")
    pairs = pairs.materialize()
    rows_out = pairs.count()
    pairs.write_parquet(run_dir.path(*INGESTED_PAIRS), filesystem=run_dir.fs, min_rows_per_file=ROWS_PER_FILE)

    per_source = {s.name: {"format": s.format, "inputs": list(s.files) or [s.spec.path]} for s in sources}
    return StageCounts(
        rows_in=rows_in,
        rows_out=rows_out,
        rows_quarantined=rows_quarantined,
        quarantine_reasons=dict(reasons),
        extra={
            "duplicates_removed": rows_good - rows_out,
            "sources": per_source,
            "quarantine_by_file": {
                file: {r: n for r, n in sorted(counts.items()) if r}
                for file, counts in sorted(by_file.items())
                if any(counts.keys() - {""})
            },
            "outputs": {
                "pairs": in_stage(INGESTED_PAIRS, folder=True),
                **({"quarantine": in_stage(INGEST_QUARANTINE, folder=True)} if rows_quarantined else {}),
            },
        },
    )


def _check_bad_share(by_file: dict[str, Counter[str]], limit: float, quarantine: str) -> None:
    for file, counts in sorted(by_file.items()):
        total = sum(counts.values())
        bad = total - counts.get("", 0)
        if total and bad / total > limit:
            top = ", ".join(f"{r} ({n})" for r, n in Counter({r: n for r, n in counts.items() if r}).most_common(3))
            raise IngestError(
                f"{file}: {bad} of {total} rows are bad ({bad / total:.0%} > ingest.max_bad_fraction={limit:.0%}); "
                f"top reasons: {top}. The bad rows are in {quarantine}/"
            )
