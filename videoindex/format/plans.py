"""The stored plan: every input video with its id and shard, written once per job and once per update.

Requires a table with ``PLAN_SCHEMA`` sorted by shard, then uri (``stages.plan.make_plan``; an update
keeps every row where it was and appends new shards). ``_job.json`` names the plan in force (``plan.file``),
so a resume reads the same plan and shard contents never change under a job. Deleted inputs stay in the
plan, flagged, so that their shard knows to drop their rows. ``VideoTask`` is one live row as the stages
see it.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


TASK_FIELDS = [f.name for f in dataclasses.fields(VideoTask)]


def write_plan(fs: Any, root: str, plan: pa.Table, shard_size: int, file: str = PLAN_FILE) -> None:
    buf = io.BytesIO()
    pq.write_table(plan, buf, row_group_size=max(shard_size * 16, 1024), compression="zstd")
    storage.write_bytes(fs, storage.join(root, file), buf.getvalue())


def plan_file_of(record: dict[str, Any]) -> str:
    """The plan a job record names (records written before updates existed name none: the first plan)."""
    return str(record.get("plan", {}).get("file") or PLAN_FILE)


def read_plan(fs: Any, root: str, shard: int | None = None, file: str = PLAN_FILE) -> pa.Table:
    """The stored plan, or one shard of it (row-group statistics make that a small read). Columns added
    since a plan was written come back filled: generation 0, not deleted."""
    path = storage.join(root, file)
    filters = [("shard", "=", shard)] if shard is not None else None
    plan = storage.with_retries(
        lambda: pq.read_table(path, filesystem=fs, filters=filters, schema=PLAN_SCHEMA), what=f"read {path}"
    )
    for name, default in (("generation", pa.scalar(0, pa.int32())), ("deleted", pa.scalar(False))):
        index = plan.schema.get_field_index(name)
        plan = plan.set_column(index, PLAN_SCHEMA.field(name), pc.fill_null(plan[name], default))
    return plan


def live(plan_rows: pa.Table) -> pa.Table:
    """The rows of inputs that still exist (an update flags deleted ones and keeps them)."""
    if "deleted" not in plan_rows.column_names:
        return plan_rows
    return plan_rows.filter(pc.invert(pc.fill_null(plan_rows["deleted"], False)))


def shard_tasks(plan_rows: pa.Table) -> list[VideoTask]:
    """``plan_rows`` as tasks (rows of ``live`` inputs: a deleted one has nothing to index)."""
    return [VideoTask(**row) for row in plan_rows.select(TASK_FIELDS).to_pylist()]


class ShardRows:
    """Each shard's rows of a plan sorted by shard, found by binary search (no per-shard scan)."""

    def __init__(self, plan: pa.Table) -> None:
        self.plan = plan
        self.shards = plan["shard"].to_numpy()
        if len(self.shards) > 1 and bool((np.diff(self.shards) < 0).any()):
            raise ValueError("plan rows are not sorted by shard")

    def __call__(self, shard: int) -> pa.Table:
        start, stop = np.searchsorted(self.shards, [shard, shard + 1])
        return self.plan.slice(int(start), int(stop - start))


def shard_count(plan: pa.Table) -> int:
    top = pc.max(plan["shard"]).as_py() if plan.num_rows else None
    return int(top if top is not None else -1) + 1
