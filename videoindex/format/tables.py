"""A shard's tables as Parquet: one deterministic file per shard, table and version, written and read back.

Files are named from the shard id and version (``clips/shard=00042/part-00042.parquet``; a rewrite of a
committed shard writes ``part-00042-v0003.parquet`` beside it), written whole (atomic rename locally,
single PUT on object stores), and carry no timestamps, so writing the same rows again gives
byte-identical files. The shard's commit event is written by the ledger after all three; the versions it
supersedes are deleted after it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from videoindex import storage
from videoindex.format.layout import SCHEMA_VERSION, TABLES, file_version, table_dir, table_file
from videoindex.format.schemas import STATUS_OK

# Small tables are read whole; clips are read by column, so row groups stay large enough for
# analytical scans (8k clips ~ 10 MB of logits+embeddings for the default model).
VIDEOS_ROW_GROUP = 65536


def file_metadata(model_info: Any, version: str) -> dict[bytes, bytes]:
    """Key-value metadata stored in every file: readers need no _job.json to interpret a file."""
    return {
        b"videoindex.schema_version": str(SCHEMA_VERSION).encode(),
        b"videoindex.version": version.encode(),
        b"videoindex.model": model_info.tag.encode(),
        b"videoindex.label_map": json.dumps(
            {str(k): v for k, v in sorted(model_info.id2label.items())}
        ).encode(),
    }


def parquet_bytes(table: pa.Table, metadata: dict[bytes, bytes], row_group_size: int) -> bytes:
    # No combine_chunks() copy: Arrow cuts row groups at row_group_size across chunks (tests/test_write.py).
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=row_group_size,
        compression="zstd",
        write_statistics=True,
        use_dictionary=["uri", "label", "model", "status", "error_type", "codec", "decoder", "stage"],
        store_schema=True,
    )
    return buf.getvalue()


def write_shard_tables(
    fs: Any,
    root: str,
    shard: int,
    tables: dict[str, pa.Table],
    *,
    metadata: dict[bytes, bytes],
    clips_row_group_size: int,
    version: int = 0,
) -> dict[str, int]:
    """Write the three tables of a shard as ``version``; returns bytes written per table."""
    written = {}
    for name in TABLES:
        size = clips_row_group_size if name == "clips" else VIDEOS_ROW_GROUP
        data = parquet_bytes(tables[name], metadata, size)
        storage.write_bytes(fs, storage.join(root, table_file(name, shard, version)), data)
        written[name] = len(data)
    return written


def read_shard_tables(fs: Any, root: str, shard: int, version: int = 0) -> dict[str, pa.Table]:
    """A committed shard's tables as written (used to replace failed videos on resume)."""
    return {
        name: storage.with_retries(
            lambda name=name: pq.read_table(
                storage.join(root, table_file(name, shard, version)), filesystem=fs
            ),
            what=f"read shard {shard} {name}",
        )
        for name in TABLES
    }


def remove_superseded(fs: Any, root: str, shard: int, version: int) -> list[str]:
    """After ``version`` of a shard is committed, delete its older files: the version it replaced and any
    that an attempt killed before its commit left behind (one listing per table). Newer versions stay: an
    attempt thought lost may still be running, and its commit wins over this one. Returns the paths."""
    removed = []
    for name in TABLES:
        folder = storage.join(root, table_dir(name, shard))
        fs.invalidate_cache(folder)
        for leaf in storage.list_after(fs, folder):
            older = file_version(leaf)
            if older is None or older >= version:
                continue
            path = storage.join(folder, leaf)
            try:
                storage.with_retries(lambda path=path: fs.rm_file(path), what=f"delete superseded {path}")
            except FileNotFoundError:  # removed meanwhile by another attempt's clean-up
                continue
            removed.append(path)
    return removed


TABLE_ORDER = {"clips": [("uri", "ascending"), ("clip_index", "ascending")], "videos": [("uri", "ascending")],
               "errors": [("uri", "ascending")]}  # fmt: skip


def replace_videos(
    old: dict[str, pa.Table], new: dict[str, pa.Table], video_ids: Iterable[str]
) -> dict[str, pa.Table]:
    """A shard's tables with the rows of ``video_ids`` replaced by freshly indexed ones.

    Rows end in the order a clean run writes them (sorts are stable), so a retried shard is identical
    to a shard whose videos all succeeded the first time.
    """
    ids = pa.array(sorted(set(video_ids)), pa.string())
    merged = {}
    for name, table in old.items():
        table = table.select(new[name].column_names).cast(new[name].schema)
        kept = table.filter(pc.invert(pc.is_in(table["video_id"], value_set=ids)))
        merged[name] = pa.concat_tables([kept, new[name]]).sort_by(TABLE_ORDER[name])
    return merged


def _counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """{value: rows} of a column, nulls left out, as JSON-able text keys in value order."""
    counts = pc.value_counts(column.drop_null() if hasattr(column, "drop_null") else column)
    pairs = sorted((str(v["values"]), int(v["counts"])) for v in counts.to_pylist())
    return dict(pairs)


def stats_from_tables(tables: dict[str, pa.Table]) -> dict[str, Any]:
    """What readers answer from the ledger without opening the shard's files: video and clip counts,
    hours of video indexed, clip and video label histograms (by label id), failed videos by type with up
    to three example URIs and their messages, and recovered (non-fatal) errors by type."""
    videos, clips = tables["videos"], tables["clips"]
    is_ok = pc.equal(videos["status"], STATUS_OK)
    ok = int(pc.sum(is_ok).as_py() or 0)
    ok_videos, failed = videos.filter(is_ok), videos.filter(pc.invert(is_ok))
    examples: dict[str, list[str]] = {}
    messages: dict[str, list[str | None]] = {}
    for row in failed.select(["uri", "error_type", "error_message"]).sort_by("uri").to_pylist():
        examples.setdefault(row["error_type"] or "unknown", []).append(row["uri"])
        messages.setdefault(row["error_type"] or "unknown", []).append(_short(row["error_message"]))
    return {
        "videos": videos.num_rows,
        "videos_ok": ok,
        "videos_error": videos.num_rows - ok,
        "clips": clips.num_rows,
        "duration_s_ok": float(pc.sum(ok_videos["duration_s"]).as_py() or 0.0),
        "clip_labels": _counts(clips["label_id"]),
        "video_labels": _counts(ok_videos["label_id"]),
        "errors": {
            kind: {"count": len(uris), "examples": uris[:3], "messages": messages[kind][:3]}
            for kind, uris in sorted(examples.items())
        },
        "recovered": _recovered(tables["errors"]),
    }


# Messages kept in the ledger's stats (every reader loads them) are cut here; the tables keep them whole.
STATS_MESSAGE_CHARS = 200


def _short(message: str | None) -> str | None:
    if message is None or len(message) <= STATS_MESSAGE_CHARS:
        return message
    return message[:STATS_MESSAGE_CHARS] + "..."


def _recovered(errors: pa.Table) -> dict[str, dict[str, Any]]:
    """Non-fatal errors (a fallback recovered) by type: count, and the first URI with its message."""
    found: dict[str, dict[str, Any]] = {}
    recovered = errors.filter(pc.invert(pc.fill_null(errors["fatal"], False)))
    for row in recovered.select(["uri", "error_type", "error_message"]).sort_by("uri").to_pylist():
        entry = found.setdefault(row["error_type"] or "unknown",
                                 {"count": 0, "example": row["uri"], "message": _short(row["error_message"])})  # fmt: skip
        entry["count"] += 1
    return dict(sorted(found.items()))
