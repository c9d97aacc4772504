"""The stored plan (``_plan/plan.parquet``): every input video with its id and shard, written once per job.

Requires a table with ``PLAN_SCHEMA`` sorted by uri (``stages.plan.make_plan``); shard k holds rows
[k*shard_size, (k+1)*shard_size). Every resume reads the same plan, so shard contents never change
under a job. ``VideoTask`` is one row as the stages see it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from videoindex import storage
from videoindex.format.layout import PLAN_FILE
from videoindex.format.schemas import PLAN_SCHEMA


@dataclass(frozen=True)
class VideoTask:
    """One input video as the plan knows it (size/mtime may be None for manifest entries)."""

    uri: str
    video_id: str
    size_bytes: int | None
    mtime: str | None
    extra: str | None
    shard: int


def write_plan(fs: Any, root: str, plan: pa.Table, shard_size: int) -> None:
    buf = io.BytesIO()
    pq.write_table(plan, buf, row_group_size=max(shard_size * 16, 1024), compression="zstd")
    storage.write_bytes(fs, storage.join(root, PLAN_FILE), buf.getvalue())


def read_plan(fs: Any, root: str, shard: int | None = None) -> pa.Table:
    """The stored plan, or one shard of it (row-group statistics make that a small read)."""
    path = storage.join(root, PLAN_FILE)
    filters = [("shard", "=", shard)] if shard is not None else None
    return storage.with_retries(
        lambda: pq.read_table(path, filesystem=fs, filters=filters, schema=PLAN_SCHEMA), what=f"read {path}"
    )


def shard_tasks(plan_rows: pa.Table) -> list[VideoTask]:
    return [VideoTask(**row) for row in plan_rows.to_pylist()]


def tasks_by_shard(plan: pa.Table) -> dict[int, tuple[VideoTask, ...]]:
    """Every shard's videos from one read of the whole plan (the driver hands them out with the shard)."""
    found: dict[int, list[VideoTask]] = {}
    for task in shard_tasks(plan):
        found.setdefault(task.shard, []).append(task)
    return {shard: tuple(tasks) for shard, tasks in found.items()}


def shard_count(plan: pa.Table) -> int:
    return int(max(plan["shard"].to_pylist(), default=-1)) + 1
