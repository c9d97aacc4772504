"""Keep an index current (``run --update``): list INPUT again, diff it with the plan in force, and write the
next generation of the plan. Ray-free and torch-free; the job (job/run.py) then queues what changed.

A video is compared by URI and by what the listing says of its version: size, mtime (local files) or
last-modified, and ETag (object stores), plus the manifest's extra columns. Then:

- a **new** URI goes into new shards, after every existing one (existing shards never move);
- a **changed** video keeps its shard and row, with the new size/mtime/ETag; its shard re-indexes it alone
  and replaces its old rows;
- a **deleted** video is flagged in the plan (its shard must drop its rows) and its rows leave the
  ``clips``, ``videos`` and ``errors`` tables, so the index equals a fresh index of the collection as it
  is now; the job record keeps the count per generation;
- an **unchanged** video is not opened.

Every row the update touches carries the new generation number; a shard whose commit is older than its
rows' latest generation has work to do, so an update killed at any point is finished by ``resume``. The
new plan is written to its own file before ``_job.json`` names it: until then the old plan is in force.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from videoindex import storage
from videoindex.config import JobConfig
from videoindex.format.jobrecord import generations
from videoindex.format.layout import JOB_FILE, plan_file
from videoindex.format.plans import live, read_plan, write_plan
from videoindex.format.schemas import PLAN_SCHEMA
from videoindex.stages import plan as planning

log = logging.getLogger(__name__)

VERSION_COLUMNS = ("size_bytes", "mtime", "etag", "extra")  # what says a video changed, besides its URI
LISTING_SCHEMA = pa.schema([PLAN_SCHEMA.field(n) for n in ("uri", *VERSION_COLUMNS)])


class UpdateError(ValueError):
    """An update that must not run (nothing listed, or a mass delete not asked for); nothing was written."""


@dataclass(frozen=True)
class PlanDiff:
    """The next generation's plan and what changed to make it."""

    plan: pa.Table
    generation: int
    new: int
    changed: int
    deleted: int
    unchanged: int

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted)

    def counts(self) -> dict[str, int]:
        return {
            "new": self.new,
            "changed": self.changed,
            "deleted": self.deleted,
            "unchanged": self.unchanged,
        }


def listing_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A listing as a table sorted by URI, with duplicate URIs dropped (the first kept, as ``make_plan``)."""
    table = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).sort_by("uri")  # a stable sort
    if table.num_rows < 2:
        return table
    uris = table["uri"].combine_chunks()
    first = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def _version(columns: list[pa.ChunkedArray]) -> pa.ChunkedArray:
    """One comparable string per row from the version columns (a null is its own value)."""
    parts = [pc.cast(c, pa.string()) for c in columns]
    return pc.binary_join_element_wise(*parts, "\x1f", null_handling="replace", null_replacement="\x00")


def diff_plan(plan: pa.Table, listed: pa.Table, shard_size: int, generation: int) -> PlanDiff:
    """The plan after a new listing: rows updated in place, deleted rows flagged, new URIs in new shards."""
    rows = plan.append_column("_row", pa.array(np.arange(plan.num_rows), pa.int64()))
    now = listed.rename_columns(["uri", *(f"_new_{c}" for c in VERSION_COLUMNS)])
    now = now.append_column("_listed", pa.array(np.ones(now.num_rows, bool)))
    merged = rows.join(now, keys="uri", join_type="left outer").sort_by("_row")
    present = pc.fill_null(merged["_listed"], False)
    was_deleted = merged["deleted"]
    # Plans written before ETags were recorded have none: the listed one is taken, not called a change.
    merged = merged.set_column(merged.schema.get_field_index("etag"), "etag",
                               pc.coalesce(merged["etag"], merged["_new_etag"]))  # fmt: skip
    differs = pc.not_equal(_version([merged[c] for c in VERSION_COLUMNS]),
                           _version([merged[f"_new_{c}"] for c in VERSION_COLUMNS]))  # fmt: skip
    changed = pc.and_(pc.and_(present, pc.invert(was_deleted)), differs)
    readded = pc.and_(present, was_deleted)
    removed = pc.and_(pc.invert(present), pc.invert(was_deleted))
    touched = pc.or_(pc.or_(changed, readded), removed)
    refreshed = pc.or_(changed, readded)
    columns = {name: merged[name] for name in PLAN_SCHEMA.names}
    for name in VERSION_COLUMNS:
        columns[name] = pc.if_else(refreshed, merged[f"_new_{name}"], merged[name])
    columns["generation"] = pc.if_else(touched, pa.scalar(generation, pa.int32()), merged["generation"])
    columns["deleted"] = pc.or_(removed, pc.and_(was_deleted, pc.invert(readded)))
    kept = pa.table(columns, schema=PLAN_SCHEMA)
    added = listed.filter(pc.invert(pc.is_in(listed["uri"], value_set=plan["uri"])))
    first_shard = int(pc.max(plan["shard"]).as_py()) + 1 if plan.num_rows else 0
    fresh = planning.make_plan(added.to_pylist(), shard_size)
    fresh = fresh.set_column(fresh.schema.get_field_index("shard"), PLAN_SCHEMA.field("shard"),
                             pc.add(fresh["shard"], pa.scalar(first_shard, pa.int32())))  # fmt: skip
    fresh = fresh.set_column(fresh.schema.get_field_index("generation"), PLAN_SCHEMA.field("generation"),
                             pa.array(np.full(fresh.num_rows, generation, np.int32)))  # fmt: skip
    count = lambda mask: int(pc.sum(mask).as_py() or 0)  # noqa: E731
    unchanged = count(pc.and_(pc.and_(present, pc.invert(was_deleted)), pc.invert(differs)))
    return PlanDiff(pa.concat_tables([kept, fresh]), generation, new=fresh.num_rows + count(readded),
                    changed=count(changed), deleted=count(removed), unchanged=unchanged)  # fmt: skip


def update_plan(config: JobConfig, fs: Any, root: str, plan: pa.Table, record: dict[str, Any], *,
                allow_mass_delete: bool = False) -> tuple[pa.Table, dict[str, Any], PlanDiff]:  # fmt: skip
    """List INPUT again and put the next generation's plan in force; nothing is written when nothing
    changed. Raises PlanError (input unreadable) or UpdateError (listed empty, or a mass delete)."""
    generation = int(record.get("plan", {}).get("generation", 0)) + 1
    rows = planning.list_inputs(config.input)
    videos = live(plan).num_rows
    if not rows:
        raise UpdateError(
            f"input {config.input.uri!r} lists no videos now; an update would delete all {videos} videos of the "
            "index. Nothing was changed: check input.uri, its extensions and the credentials."
        )
    diff = diff_plan(plan, listing_table(rows), config.output.shard_size, generation)
    if diff.deleted * 2 > videos and not allow_mass_delete:
        raise UpdateError(
            f"this update would delete {diff.deleted} of the index's {videos} videos (more than half: "
            f"{config.input.uri!r} may be the wrong input). Nothing was changed; pass --allow-mass-delete "
            "(input.allow_mass_delete: true) if the videos really are gone."
        )
    if diff.empty:
        log.info("update: nothing changed in %s since generation %d (%d videos); nothing written",
                 config.input.uri, generation - 1, videos)  # fmt: skip
        return plan, record, diff
    write_plan(fs, root, diff.plan, config.output.shard_size, plan_file(generation))  # not yet in force
    record = _name_plan(fs, root, record, diff)
    log.info("update to generation %d: %d new, %d changed, %d deleted, %d unchanged videos", generation,
             diff.new, diff.changed, diff.deleted, diff.unchanged)  # fmt: skip
    return diff.plan, record, diff


def _name_plan(fs: Any, root: str, record: dict[str, Any], diff: PlanDiff) -> dict[str, Any]:
    """Put a written plan in force: _job.json names it, with the generation's counts and touched shards."""
    touched = diff.plan.filter(pc.equal(diff.plan["generation"], diff.generation))["shard"]
    entry = {"generation": diff.generation, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "videos": live(diff.plan).num_rows, **diff.counts(),
             "shards": sorted(int(s) for s in pc.unique(touched).to_pylist())}  # fmt: skip
    shards = int(pc.max(diff.plan["shard"]).as_py()) + 1
    plan = {**record["plan"], "videos": entry["videos"], "shards": shards, "file": plan_file(diff.generation),
            "generation": diff.generation}  # fmt: skip
    record = {**record, "plan": plan, "generations": [*generations(record), entry]}
    storage.write_json(fs, storage.join(root, JOB_FILE), record)
    return record


def adopt_unnamed_plan(fs: Any, root: str, plan: pa.Table, record: dict[str, Any]
                       ) -> tuple[pa.Table, dict[str, Any]] | None:  # fmt: skip
    """An update killed after writing its plan, before _job.json named it (the plan file is whole: it is
    written in one PUT or one rename): name it now, so that this run finishes the update. None if there
    is no such plan."""
    generation = int(record.get("plan", {}).get("generation", 0)) + 1
    path = storage.join(root, plan_file(generation))
    if not storage.exists(fs, path):
        return None
    log.warning("an update to generation %d was killed before it was recorded; finishing it", generation)
    new = read_plan(fs, root, file=plan_file(generation))
    touched = new.filter(pc.equal(new["generation"], generation))
    was_live = pc.is_in(touched["uri"], value_set=live(plan)["uri"])
    deleted = touched["deleted"]
    count = lambda mask: int(pc.sum(mask).as_py() or 0)  # noqa: E731
    changed = count(pc.and_(was_live, pc.invert(deleted)))
    fresh = count(pc.and_(pc.invert(was_live), pc.invert(deleted)))
    diff = PlanDiff(new, generation, new=fresh, changed=changed, deleted=count(deleted),
                    unchanged=live(new).num_rows - fresh - changed)  # fmt: skip
    return new, _name_plan(fs, root, record, diff)
