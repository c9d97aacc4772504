"""Compaction: the small tables (``videos``, ``errors``) of committed shards copied into a few large files.

Why: a job of 100,000 shards leaves 100,000 tiny files per table, and a reader of ``videos`` pays one
request per file on object storage. Compaction copies the rows of many shards into one file and names,
in a manifest, which commit of which shard each file holds::

    _compacted/{table}/{seq:08d}-{part:04d}-{token}.parquet   rows of up to SHARDS_PER_FILE shards, ``shard`` a column
    _compacted/clip_label_bounds/...parquet                    per shard and clip label: the best clip score
    _compacted/clip_embeddings/...parquet                      what `similar` scans: each clip's embedding and
                                                               result columns (up to EMBEDDINGS_FILE_CLIPS a file)
    _compacted/manifests/{seq:08d}.parquet                     table, file, shard, version, attempt: written last

The label bounds are derived from the clips (two columns of each clips file read once): a label search
reads shards best bound first and stops when no unread shard can beat what it found (query.Index.search).
The clip embeddings are copied too (optional, on by default: ``output.compact_embeddings``): a nearest
neighbour search needs every embedding, and reading them from a few large files instead of every
shard's clips file keeps its requests flat; they are stored twice (about two thirds of the clips
table's bytes), the price of that.

The per-shard files stay the truth (plain Hive readers of ``videos/`` never see ``_compacted/``). A
videoindex reader uses a compacted file only while it exists and every shard in it is still committed by
the commit it copied (the files' version and the attempt that committed them: ``ShardState.commit``);
otherwise it reads those shards' own files. So a retried video replaces its row wherever the row lived,
and a crash at any point leaves a readable index with the same rows: files written before their
manifest are never read, and an older manifest stays valid for the commits it names. A later compaction
copies what is not covered (new shards, rewritten ones), keeps every file that is still good, and copies
the files that are not full yet anew once a table has MERGE_AFTER_FILES of them. Clean-up deletes manifests older
than the previous one, and files that no manifest from the previous one on names and whose sequence
number is below the new one (a compaction running beside this one writes at a sequence number no lower);
while any of those manifests cannot be read it deletes no file. ``clips`` are not compacted as such: a
shard's clips file is already large; the bounds let a label search skip most of them.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from videoindex import storage
from videoindex.format import layout, schemas
from videoindex.format.ledger import Ledger, LedgerView

log = logging.getLogger(__name__)

Commit = tuple[int, int]  # (version of a shard's files, attempt that committed them): ShardState.commit

COMPACTED_DIR = "_compacted"
MANIFESTS = f"{COMPACTED_DIR}/manifests"
# Derived from clips, per shard and clip label: the best score (what lets a label search stop early).
BOUNDS = "clip_label_bounds"
# Derived from clips: what a nearest-neighbour search (query.Index.similar) scans and returns.
EMBEDDINGS = "clip_embeddings"
EMBEDDINGS_COLUMNS = ("uri", "video_id", "clip_index", "start_s", "end_s", "label", "score", "embedding")
COMPACTED_TABLES = ("videos", "errors", BOUNDS, EMBEDDINGS)
SOURCE_TABLE = {BOUNDS: "clips", EMBEDDINGS: "clips"}  # derived tables: the per-shard table they come from
EMBEDDINGS_FILE_CLIPS = 131072  # ~200 MiB of 384-d embeddings a file: few requests, a bounded re-copy
EMBEDDINGS_ROW_GROUP = 16384
EMBEDDINGS_KEY = b"videoindex.compact_embeddings"  # manifest metadata: what `videoindex compact` repeats
TEMP_MAX_AGE_S = 3600  # a temporary file of ours this old, of an earlier sequence number, was left by a crash
BOUNDS_ROW_GROUP = 8192  # rows sorted by label: a search reads its labels' row groups only
SHARDS_PER_FILE = 4096  # one rewritten shard sends readers back to at most this many per-shard files
MERGE_AFTER_FILES = 16  # a table with this many files not full yet: those are copied anew together
COPY_TRIES = 3  # a shard rewritten while its files were copied: read the ledger again and copy again
MANIFEST_SCHEMA = pa.schema([("table", pa.string()), ("file", pa.string()), ("shard", pa.int32()),
                             ("version", pa.int32()), ("attempt", pa.int32())])  # fmt: skip
TABLE_SCHEMAS = {"videos": schemas.VIDEOS_SCHEMA, "errors": schemas.ERRORS_SCHEMA}
BOUNDS_SCHEMA = pa.schema([("label_id", pa.int32()), ("shard", pa.int32()), ("max_score", pa.float32())])


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's native local filesystem where we can; any other fsspec filesystem through its handler,
    so every store fsspec knows (with the caller's storage_options) works without translating options."""
    if type(fs) is LocalFileSystem:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@dataclass(frozen=True)
class Manifest:
    """One manifest: its sequence number and, per compacted file, the commits of the shards it holds."""

    seq: int
    files: dict[str, dict[int, Commit]]  # file (relative to OUTPUT) -> {shard: commit copied}
    tables: dict[str, str]  # file -> table
    embeddings: bool | None = None  # whether it was asked to copy the embeddings; None: an older manifest

    def shards_of(self, files: Iterable[str]) -> set[int]:
        """The shards the given files hold."""
        return {s for f in files for s in self.files[f]}

    def entries(self, files: Iterable[str]) -> list[dict[str, Any]]:
        return [
            {"table": self.tables[f], "file": f, "shard": s, "version": v, "attempt": a}
            for f in files
            for s, (v, a) in sorted(self.files[f].items())
        ]


def _seq(name: str) -> int | None:
    """The sequence number of a manifest or compacted file name; None for any other name."""
    stem = name.split(".", 1)[0].split("-", 1)[0]
    return int(stem) if stem.isdigit() and name.endswith(".parquet") else None


def _below(name: str, seq: int) -> bool:
    found = _seq(name)
    return found is not None and found < seq


def _list(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    fs.invalidate_cache(path)  # stores whose listings come from fsspec's directory cache
    return storage.list_after(fs, path)


def _manifest_names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Manifest names, newest first."""
    named = [n for n in _list(fs, storage.join(root, MANIFESTS)) if _seq(n) is not None]
    return sorted(named, key=lambda n: _seq(n) or 0, reverse=True)


def _read_one(fs: fsspec.AbstractFileSystem, root: str, name: str) -> Manifest:
    """One manifest; transient storage errors are retried, anything else raises."""
    data = storage.with_retries(lambda: fs.cat_file(storage.join(root, MANIFESTS, name)), what=f"read {name}")
    # use_threads=False: a small table, and no Arrow pool work left running when a command exits (an
    # Arrow thread torn down mid-task aborts the interpreter: apache/arrow#39862).
    table = pq.read_table(io.BytesIO(data), columns=MANIFEST_SCHEMA.names, use_threads=False)
    asked = (table.schema.metadata or {}).get(EMBEDDINGS_KEY)
    table = table.cast(MANIFEST_SCHEMA)
    files: dict[str, dict[int, Commit]] = {}
    tables: dict[str, str] = {}
    for row in table.to_pylist():
        files.setdefault(row["file"], {})[row["shard"]] = (row["version"], row["attempt"])
        tables[row["file"]] = row["table"]
    return Manifest(_seq(name) or 0, files, tables, None if asked is None else asked == b"true")


def read_manifest(
    fs: fsspec.AbstractFileSystem, root: str, names: list[str] | None = None
) -> Manifest | None:
    """The newest manifest that reads; an unreadable one is skipped with a warning (the one before it, or
    none: every shard's own files, stays correct for every commit it names). ``names``: a listing already
    made (``_manifest_names``)."""
    for name in _manifest_names(fs, root) if names is None else names:
        try:
            return _read_one(fs, root, name)
        except Exception as exc:  # damaged, truncated, or storage failing after retries: never fatal here
            log.warning("compaction manifest %s is unreadable (%s); reading the one before it", name, exc)
    return None


@dataclass(frozen=True)
class TableFiles:
    """Where a table's committed rows are: compacted files standing in for whole groups of shards, and
    the per-shard files of every other committed shard."""

    compacted: tuple[str, ...]  # paths
    shards: tuple[tuple[int, str], ...]  # (shard, path)

    def dataset(self, arrow_fs: pafs.FileSystem, schema: pa.Schema) -> ds.Dataset:
        """One dataset over both; ``shard`` is a column of compacted files and each other file's partition.
        from_paths: no listing and no per-file stat (one HEAD per file on object stores)."""
        return ds.FileSystemDataset.from_paths(
            [*self.compacted, *(path for _, path in self.shards)],
            schema=schema,
            format=ds.ParquetFileFormat(),
            filesystem=arrow_fs,
            partitions=[ds.scalar(True)] * len(self.compacted)
            + [ds.field("shard") == s for s, _ in self.shards],
        )


def _good_files(
    manifest: Manifest | None, table: str, commits: dict[int, Commit], present: set[str]
) -> list[str]:
    """The manifest's files of ``table`` that exist and whose every shard is still committed by the
    commit they copied."""
    if manifest is None:
        return []
    return sorted(
        f
        for f, shards in manifest.files.items()
        if manifest.tables[f] == table
        and f.rsplit("/", 1)[-1] in present
        and all(commits.get(s) == c for s, c in shards.items())
    )


def _present(fs: fsspec.AbstractFileSystem, root: str, table: str) -> set[str]:
    return set(_list(fs, storage.join(root, COMPACTED_DIR, table)))


def _shard_file(root: str, table: str, shard: int, commit: Commit) -> str:
    """A shard's own file for ``table`` (a derived table: the file it is derived from)."""
    return storage.join(root, layout.table_file(SOURCE_TABLE.get(table, table), shard, commit[0]))


def compacted_tables(embeddings: bool) -> tuple[str, ...]:
    """The tables a compaction writes: the clip embeddings only when asked (they double their bytes)."""
    return COMPACTED_TABLES if embeddings else tuple(t for t in COMPACTED_TABLES if t != EMBEDDINGS)


def committed_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    table: str,
    commits: dict[int, Commit],
    manifest: Manifest | None,
) -> TableFiles:
    """The files a reader reads for ``table`` over committed shards ({shard: commit}, from
    ``LedgerView.committed_commits``). ``manifest``: ``read_manifest``'s; with one, a listing of the
    table's compacted folder checks that its files exist."""
    good: list[str] = []
    if manifest is not None and table in COMPACTED_TABLES:
        good = _good_files(manifest, table, commits, _present(fs, root, table))
    covered = manifest.shards_of(good) if manifest is not None else set()
    return TableFiles(
        compacted=tuple(storage.join(root, f) for f in good),
        shards=tuple(
            (s, _shard_file(root, table, s, c)) for s, c in sorted(commits.items()) if s not in covered
        ),
    )


def label_bounds(
    fs: fsspec.AbstractFileSystem,
    root: str,
    commits: dict[int, Commit],
    manifest: Manifest | None,
    label_ids: list[int],
) -> tuple[dict[int, float], set[int]]:
    """For the committed shards a good bounds file covers: {shard: best score of a clip with one of
    ``label_ids``} (a covered shard absent from it has no such clip), and the covered shards. Shards not
    covered (new or rewritten since the last compaction) must be searched whatever their scores."""
    if manifest is None:
        return {}, set()
    good = _good_files(manifest, BOUNDS, commits, _present(fs, root, BOUNDS))
    if not good:
        return {}, set()
    covered = manifest.shards_of(good)
    dataset = ds.FileSystemDataset.from_paths(
        [storage.join(root, f) for f in good], schema=BOUNDS_SCHEMA, format=ds.ParquetFileFormat(),
        filesystem=arrow_filesystem(fs))  # fmt: skip
    rows = dataset.to_table(columns=["shard", "max_score"], filter=ds.field("label_id").isin(label_ids))
    if rows.num_rows == 0:
        return {}, covered
    best = rows.group_by("shard").aggregate([("max_score", "max")])
    return dict(zip(best["shard"].to_pylist(), best["max_score_max"].to_pylist(), strict=True)), covered


@dataclass(frozen=True)
class CompactionResult:
    seq: int | None  # the manifest written; None: nothing to do (fewer than min_shards not covered)
    shards_pending: int  # committed shards not covered by a good compacted file, before this compaction
    files_written: int
    files_deleted: int


def compact(
    fs: fsspec.AbstractFileSystem,
    root: str,
    *,
    min_shards: int = 1,
    view: LedgerView | None = None,
    embeddings: bool = True,
) -> CompactionResult:
    """Copy the small tables of committed shards not yet covered into new files, then write the manifest
    that names them (and every still-good file), then clean up. Does nothing while fewer than
    ``min_shards`` committed shards are uncovered. ``view``: the ledger as just read (a job's end), else
    it is read here. ``embeddings``: copy the clip embeddings too; without them, a manifest naming
    earlier copies is replaced (whatever ``min_shards``) by one that does not, and the compaction after
    that deletes their files. A shard rewritten while its files were being copied (they vanish) starts
    the copy again from a fresh read of the ledger."""
    tables = compacted_tables(embeddings)
    for tries_left in range(COPY_TRIES - 1, -1, -1):
        try:
            return _compact_once(fs, root, min_shards, view, tables)
        except FileNotFoundError as exc:
            if tries_left == 0:
                raise
            log.info("a shard was rewritten while compaction copied it (%s); reading the ledger again", exc)
            view = None
    raise AssertionError("unreachable")


def _full(manifest: Manifest, table: str, file: str, clips: dict[int, int]) -> bool:
    """A file that a merge leaves alone: as many shards as a file takes, or (embeddings) half the clips."""
    shards = manifest.files[file]
    if len(shards) >= SHARDS_PER_FILE:
        return True
    return table == EMBEDDINGS and sum(clips.get(s, 0) for s in shards) >= EMBEDDINGS_FILE_CLIPS // 2


def _groups(table: str, shards: list[int], clips: dict[int, int]) -> list[list[int]]:
    """The pending shards of ``table`` cut into files: SHARDS_PER_FILE shards, or for the embeddings as
    many shards as make up EMBEDDINGS_FILE_CLIPS clips (the ledger's counts; at least one shard a file)."""
    groups: list[list[int]] = []
    size = 0
    for shard in shards:
        weight = clips.get(shard, 0) if table == EMBEDDINGS else 0
        too_many_clips = size > 0 and size + weight > EMBEDDINGS_FILE_CLIPS
        if not groups or len(groups[-1]) >= SHARDS_PER_FILE or too_many_clips:
            groups.append([])
            size = 0
        groups[-1].append(shard)
        size += weight
    return groups


def _unnamed(manifest: Manifest, present: dict[str, set[str]]) -> bool:
    """Compacted files at or below ``manifest``'s sequence number that it does not name: a compaction
    with nothing to copy still deletes them (the copies a compaction without embeddings dropped)."""
    return any(
        f"{COMPACTED_DIR}/{table}/{name}" not in manifest.files and _below(name, manifest.seq + 1)
        for table, names in present.items()
        for name in names
    )


def _clip_counts(
    view: LedgerView, commits: dict[int, Commit], arrow_fs: pafs.FileSystem, root: str
) -> dict[int, int]:
    """Each committed shard's clips, from the ledger's counts; a shard whose commit has none (written
    by hand or by an early version) is counted from its clips file's footer."""
    counts = {s: view.state(s).counts.get("clips") for s in commits}
    return {
        s: int(n)
        if n is not None
        else pq.read_metadata(_shard_file(root, "clips", s, commits[s]), filesystem=arrow_fs).num_rows
        for s, n in counts.items()
    }


def _compact_once(
    fs: fsspec.AbstractFileSystem,
    root: str,
    min_shards: int,
    view: LedgerView | None,
    tables: tuple[str, ...],
) -> CompactionResult:
    view = view if view is not None else Ledger(fs, root).view()
    commits = view.committed_commits()
    arrow_fs = arrow_filesystem(fs)
    clips = _clip_counts(view, commits, arrow_fs, root) if EMBEDDINGS in tables else {}
    existing = _manifest_names(fs, root)
    manifest = read_manifest(fs, root, existing)
    present = {table: _present(fs, root, table) for table in COMPACTED_TABLES}
    good = {t: _good_files(manifest, t, commits, present[t]) for t in tables}
    keep = dict(good)
    for t, files in good.items():  # many files not full yet (small compactions): copied anew together
        full = [f for f in files if manifest is not None and _full(manifest, t, f, clips)]
        if len(files) - len(full) >= MERGE_AFTER_FILES:
            keep[t] = full
    pending = {
        t: sorted(set(commits) - manifest.shards_of(keep[t])) if manifest else sorted(commits) for t in tables
    }
    uncovered = len(set().union(*pending.values()))
    if uncovered == 0 or uncovered < min_shards:
        # Too little to copy. Still a new manifest if the last one holds copies no longer wanted (the
        # embeddings, after a compaction without them): it names the good files of the other tables.
        if manifest is None or all(t in tables for t in manifest.tables.values()):
            deleted = 0
            if manifest is not None and _unnamed(manifest, present):  # dropped copies, a crash's orphans
                deleted = _clean_up(fs, root, manifest.seq + 1, manifest.seq, present)
            return CompactionResult(None, uncovered, 0, deleted)
        keep, pending = good, {t: [] for t in tables}
    seq = max([_seq(n) or 0 for n in existing], default=0) + 1
    rows = manifest.entries(f for t in tables for f in keep[t]) if manifest else []
    written = 0
    for table in tables:
        for part, group in enumerate(_groups(table, pending[table], clips)):
            shards = {s: commits[s] for s in group}
            name = f"{COMPACTED_DIR}/{table}/{seq:08d}-{part:04d}-{secrets.token_hex(4)}.parquet"
            _write_compacted(fs, root, arrow_fs, table, shards, name)
            rows += [{"table": table, "file": name, "shard": s, "version": v, "attempt": a}
                     for s, (v, a) in shards.items()]  # fmt: skip
            written += 1
    asked = {EMBEDDINGS_KEY: b"true" if EMBEDDINGS in tables else b"false"}
    entries = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA.with_metadata(asked))
    storage.write_bytes(fs, storage.join(root, MANIFESTS, f"{seq:08d}.parquet"), _parquet(entries))
    log.info("compacted %d shards of %s into %d files (manifest %d)", uncovered, root, written, seq)
    # Manifests from the previous readable one on stay (with every file they name); with none readable,
    # every manifest there was stays.
    keep_from = manifest.seq if manifest else min([_seq(n) or seq for n in existing] + [seq])
    deleted = _clean_up(fs, root, seq, keep_from, present)
    return CompactionResult(seq, uncovered, written, deleted)


def _parquet(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _write_compacted(
    fs: fsspec.AbstractFileSystem,
    root: str,
    arrow_fs: pafs.FileSystem,
    table: str,
    commits: dict[int, Commit],
    name: str,
) -> None:
    if table == EMBEDDINGS:
        _write_embeddings(fs, root, arrow_fs, commits, name)
        return
    if table == BOUNDS:
        data, row_group = _label_bounds_of(fs, root, arrow_fs, commits), BOUNDS_ROW_GROUP
    else:
        files = committed_files(fs, root, table, commits, None)
        schema = TABLE_SCHEMAS[table].append(pa.field("shard", pa.int32()))
        rows = files.dataset(arrow_fs, schema).to_table().sort_by("shard")
        with fs.open(files.shards[0][1], "rb") as fh:  # the per-shard files' metadata: model, label map
            data, row_group = rows.replace_schema_metadata(pq.read_schema(fh).metadata), None
    storage.write_bytes(fs, storage.join(root, name), _parquet(data, row_group))


def embeddings_schema(clips: pa.Schema) -> pa.Schema:
    """The compacted embeddings' columns, as the clips table types them, and ``shard``."""
    return pa.schema([clips.field(c) for c in EMBEDDINGS_COLUMNS] + [pa.field("shard", pa.int32())])


def _write_embeddings(
    fs: fsspec.AbstractFileSystem, root: str, arrow_fs: pafs.FileSystem, commits: dict[int, Commit], name: str
) -> None:
    """Stream the shards' embedding columns into one file (never the whole file in memory)."""
    files = committed_files(fs, root, EMBEDDINGS, commits, None)  # the shards' clips files
    with fs.open(files.shards[0][1], "rb") as fh:  # types, model and label map: as the clips files have them
        source = pq.read_schema(fh)
    schema = embeddings_schema(source).with_metadata(source.metadata)
    scanner = files.dataset(arrow_fs, schema).scanner(batch_size=EMBEDDINGS_ROW_GROUP, use_threads=False)

    def write(fh: Any) -> None:
        """Row groups of exactly EMBEDDINGS_ROW_GROUP rows (the last one shorter)."""
        with pq.ParquetWriter(fh, schema, compression="zstd", use_dictionary=["uri", "label"]) as writer:
            pending = pa.Table.from_batches([], schema)
            for batch in scanner.to_batches():
                pending = pa.concat_tables([pending, pa.Table.from_batches([batch], schema)])
                while pending.num_rows >= EMBEDDINGS_ROW_GROUP:
                    writer.write_table(pending.slice(0, EMBEDDINGS_ROW_GROUP), EMBEDDINGS_ROW_GROUP)
                    pending = pending.slice(EMBEDDINGS_ROW_GROUP)
            if pending.num_rows:
                writer.write_table(pending, EMBEDDINGS_ROW_GROUP)

    storage.write_streamed(fs, storage.join(root, name), write)


def _label_bounds_of(
    fs: fsspec.AbstractFileSystem, root: str, arrow_fs: pafs.FileSystem, commits: dict[int, Commit]
) -> pa.Table:
    """Per shard and clip label, the best clip score, sorted by label then best score (two columns of
    each clips file read)."""
    files = committed_files(fs, root, BOUNDS, commits, None)  # the shards' clips files
    clips = files.dataset(arrow_fs, pa.schema([("label_id", pa.int32()), ("score", pa.float32()),
                                               ("shard", pa.int32())])).to_table()  # fmt: skip
    best = clips.group_by(["label_id", "shard"]).aggregate([("score", "max")])
    bounds = pa.table({"label_id": best["label_id"], "shard": best["shard"], "max_score": best["score_max"]},
                      schema=BOUNDS_SCHEMA)  # fmt: skip
    return bounds.sort_by([("label_id", "ascending"), ("max_score", "descending"), ("shard", "ascending")])


def _stale_temp(fs: fsspec.AbstractFileSystem, path: str, name: str, seq: int) -> bool:
    """A local temporary file of ours (``storage.write_bytes``/``write_streamed``: ``.{name}.tmp-...``)
    of an earlier sequence number and TEMP_MAX_AGE_S old: left by a compaction that died while writing
    (an embeddings file's is hundreds of MiB). A younger one may still be being written: kept."""
    if not (name.startswith(".") and ".tmp-" in name and _below(name[1:].split(".tmp-", 1)[0], seq)):
        return False
    try:
        return time.time() - float(fs.info(path)["mtime"]) > TEMP_MAX_AGE_S
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _clean_up(
    fs: fsspec.AbstractFileSystem, root: str, seq: int, keep_from: int, present: dict[str, set[str]]
) -> int:
    """Delete manifests below ``keep_from``, then compacted files listed before this compaction wrote
    any (``present``) whose sequence number is below ``seq`` and that no manifest from ``keep_from`` on
    names (listed again: a compaction beside this one may have written one). Best effort: what stays is
    only unread storage until the next compaction."""
    names = _manifest_names(fs, root)  # again: a compaction beside this one may have written one
    doomed = [storage.join(root, MANIFESTS, n) for n in names if _below(n, keep_from)]
    named: set[str] = set()
    for name in names:
        if not _below(name, keep_from):
            try:
                named |= set(_read_one(fs, root, name).files)
            except Exception as exc:
                log.warning("compaction clean-up: manifest %s unreadable (%s); no file deleted", name, exc)
                named = None  # type: ignore[assignment]
                break
    if named is not None:
        for table, names in present.items():
            doomed += [
                storage.join(root, COMPACTED_DIR, table, n)
                for n in names
                if f"{COMPACTED_DIR}/{table}/{n}" not in named and _below(n, seq)
            ]
            doomed += [
                path
                for n in names
                if _stale_temp(fs, path := storage.join(root, COMPACTED_DIR, table, n), n, seq)
            ]
    deleted = 0
    for path in doomed:
        try:
            fs.rm_file(path)
            deleted += 1
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("compaction clean-up: cannot delete %s (%s); it is left unread", path, exc)
    return deleted
