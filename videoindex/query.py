"""Query layer over an OUTPUT: summaries, label counts, label search, video timelines, similar clips, SQL.

Requires ``OUTPUT/_job.json`` (model, label map) and the ledger; produces pyarrow Tables. Only committed
shards are visible: file paths are built from the commit markers (one listing of ``_ledger/``) and
``layout.table_file`` with the version each commit names, never from listing the table directories, so
a half-written shard or a rewrite not yet committed is never read; ``videos`` and ``errors`` (and the
embeddings ``similar`` scans) come from compacted files where those still hold each shard's committed
rows (format/compaction.py). Works on
local paths and any fsspec URI (s3://, gs://...) with ``storage_options``; DuckDB scans the pyarrow datasets lazily (projection and filter pushdown), so no DuckDB httpfs is needed.

    idx = videoindex.open("s3://bucket/index", {"anon": False})
    idx.search("pushing", min_score=0.5)
    idx.sql("SELECT label, avg(score) FROM clips GROUP BY label")
"""

from __future__ import annotations

import argparse
import base64
import difflib
import functools
import io
import json
import logging
import os
import sys
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from videoindex import storage
from videoindex.config import ConfigError, parse_storage_options
from videoindex.format import layout, schemas
from videoindex.format.compaction import (
    COMPACTED_TABLES,
    EMBEDDINGS,
    EMBEDDINGS_COLUMNS,
    Manifest,
    arrow_filesystem,
    committed_files,
    embeddings_schema,
    label_bounds,
    read_manifest,
)
from videoindex.format.errortypes import RETRYABLE_ERROR_TYPES
from videoindex.format.jobrecord import generation_fields
from videoindex.format.ledger import Ledger, committed_totals

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
FORMATS = ("table", "csv", "json", "parquet")
TERMINAL_ROWS = 100  # rows shown by --format table; the file formats write every row
CLIP_COLUMNS = [c for c in EMBEDDINGS_COLUMNS if c != "embedding"]  # what search and similar return
SIMILAR_VIEW = "_videoindex_similar_scan"  # registered for one `similar` query, then dropped
SEARCH_FIRST_SHARDS = 16  # a bounded label search reads this many shards first, then twice as many each round


class QueryError(ValueError):
    """A query that cannot be answered; the message (one line) says why and what to do."""


class NotAnIndexError(QueryError):
    """OUTPUT has no _job.json: not a videoindex output, or the job never started."""


class FilesRewritten(QueryError):
    """A committed file vanished while it was read: a rewrite of its shard committed a newer version."""


def _vanished(exc: BaseException, root: str) -> bool:
    """A file under the index's root that is gone (not, say, a COPY target of the user's SQL)."""
    if isinstance(exc, FilesRewritten):
        return True
    text = str(exc)
    gone = ("No such file", "FileNotFoundError", "NoSuchKey")
    missing = isinstance(exc, FileNotFoundError) or (
        isinstance(exc, duckdb.Error) and any(s in text for s in gone)
    )
    return missing and root in text


REREADS = 5  # an update rewrites shard after shard: a slow query may meet several of those commits


def read_again_if_rewritten(method: Any) -> Any:
    """Readers open the file versions the commits they read name; a rewrite that commits meanwhile deletes
    the versions it replaced. Then read the ledger again and answer from the new commits (up to REREADS
    times, then the error stands)."""

    @functools.wraps(method)
    def reread(self: Index, *args: Any, **kwargs: Any) -> Any:
        if self._reading:  # inside another such call: the outermost one reads again, as a whole
            return method(self, *args, **kwargs)
        self._reading = True
        try:
            rereads = 0
            while True:
                try:
                    return method(self, *args, **kwargs)
                except Exception as exc:
                    if rereads == REREADS or not _vanished(exc, self.root):
                        raise
                    rereads += 1
                    log.info("a shard was rewritten while %s read it (%s); reading the ledger again", self.uri,
                             _one_line(exc)[:200])  # fmt: skip
                    self.refresh()
        finally:
            self._reading = False

    return reread


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def open_index(
    output: str,
    storage_options: dict[str, Any] | None = None,
    *,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> Index:
    """Open OUTPUT for queries. With `filesystem`, `output` is a path inside it (tests, byte counting)."""
    if filesystem is not None:
        fs, root = filesystem, output.rstrip("/")
    else:
        fs, root = storage.filesystem(output, storage_options)
    job_path = storage.join(root, JOB_FILE)
    if not storage.exists(fs, job_path):
        raise NotAnIndexError(
            f"{output} has no {JOB_FILE}: not a videoindex output (or its job never started)"
        )
    return Index(fs, root, output, storage.read_json(fs, job_path))


class Index:
    """The committed shards of one OUTPUT, as pyarrow datasets, DuckDB views and ready-made queries."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, uri: str, job: dict[str, Any]) -> None:
        self.fs, self.root, self.uri, self.job = fs, root, uri, job
        self.model: dict[str, Any] = job.get("model", {})
        self.id2label = {int(k): v for k, v in self.model.get("id2label", {}).items()}
        self._arrow_fs = arrow_filesystem(fs)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._reading = False  # inside a call that reads again when a rewrite deleted its files
        self.search_shards_read = 0  # clips files label searches opened (tests and benchmarks watch it)
        self.refresh()
        log.info("opened %s: %d committed shards", uri, len(self.committed))

    def refresh(self) -> None:
        """Read the ledger (the latest checkpoint and the log after it): the committed shards and the
        version of their files. Datasets are built again on next use; an open DuckDB connection keeps
        whatever the caller made in it and gets its three views pointed at the new files."""
        self.ledger = Ledger(self.fs, self.root).view()
        self.commits = self.ledger.committed_commits()  # {shard: (version of its files, attempt)}
        self.committed = sorted(self.commits)
        self._manifest: Manifest | None | bool = False  # False: not read yet (answers from stats need none)
        self._datasets: dict[str, ds.Dataset] = {}
        if self._con is not None:
            for table in layout.TABLES:
                self._con.register(table, self.dataset(table))

    @property
    def manifest(self) -> Manifest | None:
        """The compaction manifest (format/compaction.py), read on first use; None: not compacted."""
        if self._manifest is False:
            self._manifest = read_manifest(self.fs, self.root)
        return self._manifest

    @manifest.setter
    def manifest(self, value: Manifest | None) -> None:
        self._manifest = value

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @property
    def shards_total(self) -> int:
        return int(self.job.get("plan", {}).get("shards", len(self.committed)))

    def _schema(self, table: str) -> pa.Schema:
        if table in ("clips", EMBEDDINGS):
            base = schemas.clips_schema(int(self.model["num_labels"]), int(self.model["embed_dim"]))
            if table == EMBEDDINGS:  # the columns similar scans: compacted copies, else clips files
                return embeddings_schema(base)
        elif table in ("videos", "errors"):
            base = schemas.VIDEOS_SCHEMA if table == "videos" else schemas.ERRORS_SCHEMA
        else:
            raise QueryError(f"unknown table {table!r}; tables: {', '.join(layout.TABLES)}")
        return base.append(pa.field("shard", pa.int32()))

    def dataset(self, table: str) -> ds.Dataset:
        """A table over the committed shards' rows: compacted files where they still hold the commit of
        every shard in them, each other shard's own file (``shard`` from its partition). Besides the
        tables, ``clip_embeddings``: the columns ``similar`` scans (compacted copies, else clips files)."""
        if table not in self._datasets:
            manifest = self.manifest if table in COMPACTED_TABLES else None  # clips: never read it
            files = committed_files(self.fs, self.root, table, self.commits, manifest)
            self._datasets[table] = files.dataset(self._arrow_fs, self._schema(table))
        return self._datasets[table]

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with views clips, videos, errors over the datasets (scanned lazily)."""
        if self._con is None:
            self._con = duckdb.connect()
            for table in layout.TABLES:
                self._con.register(table, self.dataset(table))
        return self._con

    def relation(self, table: str) -> duckdb.DuckDBPyRelation:
        if table not in layout.TABLES:
            raise QueryError(f"unknown table {table!r}; tables: {', '.join(layout.TABLES)}")
        return self.duckdb().view(table)

    def _query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        try:
            relation = self.duckdb().sql(sql, params=params)
            if relation is None:  # statements that return no rows (SET, CREATE VIEW...)
                return pa.table({})
            return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        except duckdb.Error as exc:
            if _vanished(exc, self.root):
                raise FilesRewritten(f"a committed file vanished: {_one_line(exc)}") from exc
            raise QueryError(f"SQL error: {_one_line(exc)}") from None

    @read_again_if_rewritten
    def sql(self, query: str) -> pa.Table:
        """Any DuckDB SQL over the views clips, videos and errors."""
        return self._query(query)

    def shard_stats(self, key: str) -> list[dict[str, Any]] | None:
        """Every committed shard's stats, when all of them carry ``key`` (written by videoindex >= 0.2):
        answers from the ledger, without opening a table file. None: read the tables instead."""
        stats = self.ledger.committed_stats()
        if len(stats) != len(self.committed) or any(key not in s for s in stats):
            return None
        return stats

    def _summary_from_stats(self) -> dict[str, Any] | None:
        """The summary's numbers from the ledger alone: the checkpoint's count and label-mask columns (no
        stats JSON parsed); None when a committed shard's stats lack them (read the tables instead)."""
        labels_seen = self.ledger.labels_seen()
        counts = self.ledger.committed_counts()
        if labels_seen is None or len(counts) != len(self.committed):
            return None
        total, _ = committed_totals(counts)
        hours = sum(c.get("duration_s_ok", 0.0) for c in counts) / 3600.0
        return {**total, "hours": hours, "labels_seen": labels_seen}

    @read_again_if_rewritten
    def summary(self) -> pa.Table:
        """One row: what the index holds and which model produced it (from the ledger's shard stats)."""
        model = {"model": self.model.get("tag"), "random_weights": bool(self.model.get("random_weights"))}
        generation = generation_fields(self.job)
        shards = {"shards_committed": len(self.committed), "shards_total": self.shards_total,
                  "generation": generation["generation"], "last_update": generation["last_update"]}  # fmt: skip
        counts = self._summary_from_stats()
        if counts is not None:
            labels_seen = {"labels_seen": counts.pop("labels_seen")}
            return pa.Table.from_pylist([{**counts, **model, **labels_seen, **shards}])
        counts = self._query(
            "SELECT * FROM (SELECT count(*) AS videos, count(*) FILTER (WHERE status = 'ok') AS videos_ok, "
            "count(*) FILTER (WHERE status = 'error') AS videos_error FROM videos), "
            "(SELECT count(*) AS clips FROM clips), "
            "(SELECT coalesce(sum(duration_s) FILTER (WHERE status = 'ok'), 0) / 3600.0 AS hours FROM videos), "
            "(SELECT count(DISTINCT label) AS labels_seen FROM clips)"
        ).to_pylist()[0]
        labels_seen = {"labels_seen": counts.pop("labels_seen")}
        row = {**counts, **model, **labels_seen, **shards}
        return pa.Table.from_pylist([row])

    @read_again_if_rewritten
    def labels(self, level: str = "clip", top: int | None = None) -> pa.Table:
        """Label counts and shares, most frequent first (video level: ok videos' labels)."""
        if level not in ("clip", "video"):
            raise QueryError(f"level must be 'clip' or 'video', not {level!r}")
        limit = _positive(top, "top") if top is not None else None
        stats = self.shard_stats(f"{level}_labels")
        if stats is not None and self.id2label:
            counts: dict[str, int] = {}
            for shard in stats:
                for label_id, n in shard[f"{level}_labels"].items():
                    name = self.id2label[int(label_id)]
                    counts[name] = counts.get(name, 0) + n
            total = sum(counts.values())
            rows = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
            return pa.table({"label": [r[0] for r in rows], "count": pa.array([r[1] for r in rows], pa.int64()),
                             "share": [r[1] / total for r in rows]})  # fmt: skip
        inner = {
            "clip": "SELECT label, count(*) AS count FROM clips GROUP BY label",
            "video": "SELECT label, count(*) AS count FROM videos "
            "WHERE status = 'ok' AND label IS NOT NULL GROUP BY label",
        }[level]
        return self._query(
            f"SELECT label, count, count / sum(count) OVER () AS share FROM ({inner}) "
            f"ORDER BY count DESC, label{f' LIMIT {limit}' if limit else ''}"
        )

    def matching_labels(self, text: str) -> list[str]:
        """Known labels containing `text` (case-insensitive); QueryError with the closest ones if none."""
        known = (
            sorted(set(self.id2label.values()))
            or self._query("SELECT DISTINCT label FROM clips")["label"].to_pylist()
        )
        found = [name for name in known if text.lower() in name.lower()]
        if not found:
            lowered = {name.lower(): name for name in known}
            close = difflib.get_close_matches(text.lower(), list(lowered), n=5, cutoff=0.0)
            hint = ", ".join(repr(lowered[c]) for c in close)
            raise QueryError(f"no label matches {text!r}; closest known labels: {hint}")
        return found

    @read_again_if_rewritten
    def search(self, label: str, min_score: float = 0.0, limit: int = 100) -> pa.Table:
        """Clips whose label contains `label`, best score first.

        On a compacted index the clip-label bounds (each shard's best score per label) order the shards:
        they are read best bound first, in growing batches, until the ``limit``-th best clip found beats
        the next shard's bound, so a search reads a few shards' clips files, not every shard's. Shards the
        bounds do not cover (committed since the last compaction) are always read."""
        names = self.matching_labels(label)
        limit = _positive(limit, "limit")
        wanted = set(names)
        ids = [i for i, name in self.id2label.items() if name in wanted]
        bounds, covered = (
            label_bounds(self.fs, self.root, self.commits, self.manifest, ids) if ids else ({}, set())
        )
        if not covered:
            self.search_shards_read += len(self.committed)
            marks = ", ".join("?" * len(names))
            return self._query(
                f"SELECT {', '.join(CLIP_COLUMNS)} FROM clips WHERE label IN ({marks}) AND score >= ? "
                f"ORDER BY score DESC, video_id, clip_index LIMIT {limit}",
                [*names, float(min_score)],
            )
        ranked = sorted((s for s, b in bounds.items() if b >= min_score), key=lambda s: (-bounds[s], s))
        batch, size, start = [s for s in self.committed if s not in covered], SEARCH_FIRST_SHARDS, 0
        found = None
        while True:
            batch += ranked[start : start + size]
            start, size = start + size, size * 2
            found = self._best_clips(batch, names, float(min_score), limit, found)
            batch = []
            if start >= len(ranked):
                break
            if found.num_rows == limit and found["score"][-1].as_py() > bounds[ranked[start]]:
                break
        return found

    def _best_clips(
        self, shards: list[int], names: list[str], min_score: float, limit: int, best: pa.Table | None
    ) -> pa.Table:
        """The ``limit`` best clips of ``names`` among ``best`` and the clips files of ``shards``."""
        self.search_shards_read += len(shards)
        files = committed_files(self.fs, self.root, "clips", {s: self.commits[s] for s in shards}, None)
        where = pc.field("label").isin(names) & (pc.field("score") >= min_score)
        table = files.dataset(self._arrow_fs, self._schema("clips")).to_table(
            columns=CLIP_COLUMNS, filter=where
        )
        if best is not None:
            table = pa.concat_tables([best, table])
        order = [("score", "descending"), ("video_id", "ascending"), ("clip_index", "ascending")]
        return table.sort_by(order).slice(0, limit)

    def _resolve_video(self, ref: str) -> dict[str, Any]:
        """The videos row of a video_id or uri (a local path is also tried as file:// URI)."""
        candidates = [ref] if "://" in ref else [ref, "file://" + os.path.abspath(ref)]
        found = self.dataset("videos").to_table(
            columns=["video_id", "uri", "shard", "status", "error_type", "error_message", "num_clips"],
            filter=pc.field("video_id").isin(candidates) | pc.field("uri").isin(candidates),
        )
        if found.num_rows == 0:
            raise QueryError(f"no video {ref!r} in {self.uri} (give a video_id or uri from the videos table)")
        row = found.to_pylist()[0]
        if row["status"] != schemas.STATUS_OK:
            raise QueryError(f"video {row['uri']} has no clips: it failed ({row['error_type']}: "
                             f"{_one_line(row['error_message'] or '')})")  # fmt: skip
        return row

    def _video_clips(self, video: dict[str, Any], columns: list[str]) -> pa.Table:
        # The shard filter prunes every other file before any is opened.
        where = (pc.field("shard") == video["shard"]) & (pc.field("video_id") == video["video_id"])
        return self.dataset("clips").to_table(columns=columns, filter=where).sort_by("clip_index")

    @read_again_if_rewritten
    def video(self, uri_or_id: str) -> pa.Table:
        """A video's clip-by-clip timeline."""
        video = self._resolve_video(uri_or_id)
        columns = ["clip_index", "start_s", "end_s", "label", "score", "topk_labels", "topk_scores"]
        return self._video_clips(video, columns)

    @read_again_if_rewritten
    def similar(
        self, uri_or_id_or_clip: str | tuple[str, int], k: int = 10, clip_index: int | None = None
    ) -> pa.Table:
        """Clips nearest by cosine similarity to one clip, or to a video's mean embedding.

        A clip query excludes only that clip; a video query excludes the video's own clips.
        """
        if isinstance(uri_or_id_or_clip, tuple):
            uri_or_id_or_clip, clip_index = uri_or_id_or_clip
        video = self._resolve_video(uri_or_id_or_clip)
        own = self._video_clips(video, ["clip_index", "embedding"])
        vectors = _matrix(own["embedding"])
        if clip_index is None:
            query = vectors.mean(axis=0)
        else:
            hits = np.flatnonzero(own["clip_index"].to_numpy() == clip_index)
            if hits.size == 0:
                raise QueryError(
                    f"video {video['uri']} has no clip {clip_index} (it has {own.num_rows} clips)"
                )
            query = vectors[hits[0]]
        return self._nearest(query, _positive(k, "k"), video["video_id"], clip_index)

    def _nearest(self, query: np.ndarray, k: int, video_id: str, clip_index: int | None) -> pa.Table:
        """Top-k cosine over all clips in DuckDB: a streaming scan into a top-N, so memory stays bounded.

        Why DuckDB and not numpy over streamed record batches (measured on 1M x 384-d clips, 2 cores,
        benchmarks/bench_query.py): 1.3 s against 1.7 s on an idle machine, and faster in 4 of 5
        interleaved pairs under load. Both are bound by decoding the embedding column (~1.0 s alone);
        DuckDB computes on its own threads alongside the scan, numpy in the calling Python thread.
        """
        exclude = "video_id <> ?" if clip_index is None else "NOT (video_id = ? AND clip_index = ?)"
        params: list[Any] = [[float(x) for x in query], video_id]
        if clip_index is not None:
            params.append(int(clip_index))
        dim = int(self.model["embed_dim"])
        # The compacted embeddings (a few large files) where they cover the shards: flat requests. A view
        # for this query only: the caller's connection keeps just the three tables.
        con = self.duckdb()
        con.register(SIMILAR_VIEW, self.dataset(EMBEDDINGS))
        try:
            return self._query(
                f"SELECT {', '.join(CLIP_COLUMNS)}, array_cosine_similarity(embedding, ?::FLOAT[{dim}])"
                f"::DOUBLE AS similarity FROM {SIMILAR_VIEW} "
                f"WHERE {exclude} ORDER BY similarity DESC, video_id, clip_index LIMIT {k}",
                params,
            )
        finally:
            con.unregister(SIMILAR_VIEW)

    @read_again_if_rewritten
    def errors(self) -> pa.Table:
        """Failed videos by error type, with up to three example URIs each.

        ``retryable``: ``videoindex resume --retry-failed`` retries these by default (errors.py).
        """
        stats = self.shard_stats("errors")
        if stats is not None:
            rows = failed_by_type(stats)
            return pa.table({
                "error_type": pa.array([e["error_type"] for e in rows], pa.string()),
                "count": pa.array([e["count"] for e in rows], pa.int64()),
                "retryable": pa.array([e["error_type"] in RETRYABLE_ERROR_TYPES for e in rows], pa.bool_()),
                "example_uris": pa.array([[x["uri"] for x in e["examples"]] for e in rows], pa.list_(pa.string())),
            })  # fmt: skip
        retryable = ", ".join(f"'{t}'" for t in RETRYABLE_ERROR_TYPES)
        return self._query(
            "SELECT coalesce(error_type, 'unknown') AS error_type, count(*) AS count, "
            f"coalesce(error_type, 'unknown') IN ({retryable}) AS retryable, "
            "list_slice(list(uri ORDER BY uri), 1, 3) AS example_uris FROM videos "
            "WHERE status = 'error' GROUP BY 1 ORDER BY count DESC, error_type"
        )


def failed_by_type(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed videos by error type over committed shards' stats, most frequent first: the count and the
    three first examples by URI, each with its message where the stats hold one (as the tables' SQL orders
    them)."""
    found: dict[str, dict[str, Any]] = {}
    for shard in stats:
        for kind, entry in shard["errors"].items():
            merged = found.setdefault(kind, {"error_type": kind, "count": 0, "examples": []})
            merged["count"] += entry["count"]
            messages = entry.get("messages") or [None] * len(entry["examples"])
            examples = [{"uri": u, "message": m} for u, m in zip(entry["examples"], messages, strict=True)]
            merged["examples"] = sorted(merged["examples"] + examples, key=lambda e: e["uri"])[:3]
    return sorted(found.values(), key=lambda e: (-e["count"], e["error_type"]))


def _positive(value: int | None, name: str) -> int:
    if value is None or int(value) < 1:
        raise QueryError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A FixedSizeList<float32>[d] column as a float32 [n, d] matrix (zero copy for one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:5])
        return shown + (", ..." if len(value) > 5 else "")
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return "" if value is None else str(value)


def _render_rich(table: pa.Table, out: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = table.slice(0, TERMINAL_ROWS)
    caption = None
    if table.num_rows > TERMINAL_ROWS:
        caption = (
            f"first {TERMINAL_ROWS} of {table.num_rows} rows; --format csv|json|parquet --output FILE for all"
        )
    if table.num_rows == 1 and table.num_columns > 4:  # one record (summary): a key/value list reads better
        view = Table(show_header=False, box=None)
        view.add_column("field", style="bold")
        view.add_column("value", overflow="fold")
        for name, value in shown.to_pylist()[0].items():
            view.add_row(name, _cell(value))
        Console(file=out, width=None if out is sys.stdout else 200).print(view)
        return
    view = Table(caption=caption, show_lines=False)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in shown.to_pylist():
        view.add_row(*(_cell(v) for v in row.values()))
    Console(file=out, width=None if out is sys.stdout else 200).print(view)


def _json_default(value: Any) -> Any:
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def _csv_ready(table: pa.Table) -> pa.Table:
    """CSV has no lists: nested and binary columns become JSON text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type) or pa.types.is_binary(field.type):
            text = [
                None if v is None else json.dumps(v, default=_json_default)
                for v in table.column(i).to_pylist()
            ]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    return table


def rows_to_format(table: pa.Table, fmt: str, output: str | None = None) -> None:
    """Write query results: a rich table on the terminal, or csv/json/parquet to a file (or stdout)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise QueryError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and output is None:
        raise QueryError("--format parquet writes a file: add --output FILE")
    if fmt == "table":
        text = io.StringIO()
        _render_rich(table, text if output else sys.stdout)
        data = text.getvalue().encode()
    elif fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(_csv_ready(table), buf)
        data = buf.getvalue()
    elif fmt == "json":
        data = (json.dumps(table.to_pylist(), indent=2, default=_json_default) + "\n").encode()
    else:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
    if output is None:
        if data:
            sys.stdout.write(data.decode())
            sys.stdout.flush()
        return
    with fsspec.open(output, "wb") as fh:
        fh.write(data)
    log.info("wrote %d rows to %s", table.num_rows, output)


QUERY_EXAMPLES = """examples:
  videoindex query out/ summary
  videoindex query out/ labels --level video --top 20
  videoindex query out/ search "pushing" --min-score 0.5 --limit 20
  videoindex query out/ video file:///data/videos/cat.mp4
  videoindex query out/ similar 3f2a9c0d1e4b5a67 --clip-index 4 -k 5
  videoindex query out/ sql "SELECT label, avg(score) FROM clips GROUP BY 1 ORDER BY 2 DESC" --format csv
  videoindex query s3://bucket/index summary --storage-option anon=false
"""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    common.add_argument("--output", dest="output_file", metavar="FILE", help="write results here, not stdout")
    common.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for OUTPUT (repeatable; VALUE may be JSON)",
    )
    return common


def register_query_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `videoindex query OUTPUT <summary|labels|search|video|similar|errors|sql>`."""
    query = subparsers.add_parser(
        "query",
        help="query an index (summary, labels, search, video, similar, errors, sql)",
        epilog=QUERY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument("output", metavar="OUTPUT", help="output directory or URI of a videoindex job")
    sub = query.add_subparsers(dest="query_command", required=True, metavar="QUERY")
    common = [_common_options()]
    add = sub.add_parser
    add("summary", parents=common, help="videos, clips, hours, model").set_defaults(
        run=lambda ix, a: ix.summary()
    )
    labels = add("labels", parents=common, help="label counts and shares")
    labels.add_argument("--level", choices=["clip", "video"], default="clip")
    labels.add_argument("--top", type=int, metavar="N")
    labels.set_defaults(run=lambda ix, a: ix.labels(a.level, a.top))
    search = add("search", parents=common, help="clips whose label contains LABEL (case-insensitive)")
    search.add_argument("label", metavar="LABEL")
    search.add_argument("--min-score", type=float, default=0.0, metavar="X")
    search.add_argument("--limit", type=int, default=100, metavar="N")
    search.set_defaults(run=lambda ix, a: ix.search(a.label, a.min_score, a.limit))
    video = add("video", parents=common, help="a video's clip-by-clip timeline")
    video.add_argument("video", metavar="URI_OR_ID")
    video.set_defaults(run=lambda ix, a: ix.video(a.video))
    similar = add("similar", parents=common, help="nearest clips by embedding (cosine)")
    similar.add_argument("video", metavar="URI_OR_ID")
    similar.add_argument("--clip-index", type=int, metavar="N", help="query clip (default: the video's mean)")
    similar.add_argument("-k", type=int, default=10, metavar="N")
    similar.set_defaults(run=lambda ix, a: ix.similar(a.video, k=a.k, clip_index=a.clip_index))
    add("errors", parents=common, help="failed videos by error type").set_defaults(
        run=lambda ix, a: ix.errors()
    )
    sql = add("sql", parents=common, help="DuckDB SQL over the views clips, videos, errors")
    sql.add_argument("query", metavar="SQL")
    sql.set_defaults(run=lambda ix, a: ix.sql(a.query))


def run_query_cli(args: argparse.Namespace) -> int:
    """Run one `videoindex query` command: 0 on success, 2 (one stderr line) on a query error."""
    try:
        with open_index(args.output, parse_storage_options(args.storage_option)) as index:
            rows_to_format(args.run(index, args), args.format, args.output_file)
    except (QueryError, ConfigError) as exc:
        print(f"videoindex query: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0
