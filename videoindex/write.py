"""Write a shard's tables as Parquet: one deterministic file per shard per table.

Files are named from the shard id (``clips/shard=00042/part-00042.parquet``), written whole (atomic
rename locally, single PUT on object stores), and carry no timestamps, so writing the same rows again
gives byte-identical files. The shard's commit marker is written by the ledger after all three.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from videoindex import storage
from videoindex.schema import SCHEMA_VERSION, TABLES, table_file

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
) -> dict[str, int]:
    """Write the three tables of a shard; returns bytes written per table."""
    written = {}
    for name in TABLES:
        size = clips_row_group_size if name == "clips" else VIDEOS_ROW_GROUP
        data = parquet_bytes(tables[name], metadata, size)
        storage.write_bytes(fs, storage.join(root, table_file(name, shard)), data)
        written[name] = len(data)
    return written


def read_shard_tables(fs: Any, root: str, shard: int) -> dict[str, pa.Table]:
    """A committed shard's tables as written (used to replace failed videos on resume)."""
    return {
        name: storage.with_retries(
            lambda name=name: pq.read_table(storage.join(root, table_file(name, shard)), filesystem=fs),
            what=f"read shard {shard} {name}",
        )
        for name in TABLES
    }
