"""Plan a job: list the inputs, give each a stable id, cut them into deterministic shards.

Requires an InputConfig (directory/prefix, glob, or manifest). Produces a pyarrow table with
PLAN_SCHEMA (uri, video_id, size_bytes, mtime, extra, shard, etag, generation, deleted) sorted by uri;
shard k holds rows [k*shard_size, (k+1)*shard_size). ``format.plans`` stores it once per job
(``_plan/plan.parquet``); ``job.update`` diffs a new listing against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from videoindex import storage
from videoindex.config import InputConfig
from videoindex.format.schemas import PLAN_SCHEMA

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv", ".parquet")
GLOB_CHARS = "*?["


class PlanError(ValueError):
    """The input cannot be listed; the message says why and what to pass instead."""


def video_id(uri: str) -> str:
    """A stable id: the first 16 hex digits of sha256 of the normalised URI."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def normalise_uri(fs: Any, path: str) -> str:
    """The full URI of a path on fs (file:///abs/path for local files, s3://bucket/key for S3)."""
    return fs.unstrip_protocol(path)


def _mtime(info: dict[str, Any]) -> str | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc).isoformat()
        return str(value).strip('"')
    return None


def _etag(info: dict[str, Any]) -> str | None:
    value = info.get("ETag", info.get("etag"))
    return None if value is None else str(value).strip('"')


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    lowered = path.lower()
    return any(lowered.endswith(ext.lower()) for ext in extensions)


def _listing_rows(
    fs: Any, found: dict[str, dict[str, Any]], cfg: InputConfig, root: str = ""
) -> list[dict[str, Any]]:
    """Every listed path named like a video: files, broken links and directories (those become
    not_a_video rows, so that every input named like a video has its row)."""
    rows = []
    for path, info in found.items():
        if path.rstrip("/") == root.rstrip("/") or not _has_extension(path, cfg.extensions):
            continue
        rows.append(
            {
                "uri": normalise_uri(fs, path),
                "size_bytes": None if info.get("type") == "directory" else info.get("size"),
                "mtime": _mtime(info),
                "extra": None,
                "etag": _etag(info),
            }
        )
    return rows


def _read_manifest(fs: Any, path: str) -> pa.Table:
    data = storage.with_retries(lambda: fs.cat_file(path), what=f"read manifest {path}")
    lower = path.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    elif lower.endswith((".csv", ".tsv")):
        options = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
        table = pacsv.read_csv(io.BytesIO(data), parse_options=options)
    else:
        lines = [ln.strip() for ln in data.decode("utf-8").splitlines()]
        table = pa.table({"uri": [ln for ln in lines if ln and not ln.startswith("#")]})
    if "uri" not in table.column_names:
        raise PlanError(f"manifest {path}: no 'uri' column (columns: {table.column_names})")
    return table


def _manifest_rows(fs: Any, path: str) -> list[dict[str, Any]]:
    table = _read_manifest(fs, path)
    base = path.rsplit("/", 1)[0]
    extras = [c for c in table.column_names if c != "uri"]
    rows = []
    for record in table.to_pylist():
        uri = str(record["uri"]).strip()
        if not uri:
            continue
        if "://" not in uri and not uri.startswith("/"):
            uri = normalise_uri(fs, f"{base}/{uri}")  # relative to the manifest
        elif "://" not in uri:
            uri = normalise_uri(fs, uri)
        extra = {k: record[k] for k in extras if record[k] is not None}
        size = extra.get("size_bytes", extra.get("size"))
        rows.append(
            {
                "uri": uri,
                "size_bytes": int(size) if isinstance(size, (int, float)) else None,
                "mtime": str(extra["mtime"]) if "mtime" in extra else None,
                "extra": json.dumps(extra, sort_keys=True, default=str) if extra else None,
                "etag": str(extra["etag"]) if "etag" in extra else None,
            }
        )
    return rows


def list_inputs(cfg: InputConfig) -> list[dict[str, Any]]:
    """Rows of uri/size_bytes/mtime/extra/etag for a directory (recursive), a glob, or a manifest file.

    Raises PlanError, before any work, when the input root is unusable: a missing or denied bucket, a
    path that does not exist, a glob that matches nothing in a missing bucket.
    """
    fs, path = storage.filesystem(cfg.uri, cfg.storage_options)
    try:
        return _list_inputs(fs, path, cfg)
    except PermissionError as exc:
        raise PlanError(
            f"input {cfg.uri!r}: access denied ({exc}); check the credentials (environment, profile, "
            "instance role or input.storage_options)"
        ) from exc


def _list_inputs(fs: Any, path: str, cfg: InputConfig) -> list[dict[str, Any]]:
    if any(ch in path for ch in GLOB_CHARS):
        found = storage.with_retries(lambda: fs.glob(path, detail=True), what=f"glob {cfg.uri}")
        if not found:
            _refuse_unusable_root(fs, path, cfg.uri)
        return _listing_rows(fs, found, cfg)
    info = storage.with_retries(lambda: _info_or_none(fs, path), what=f"stat {cfg.uri}")
    if info is None:
        _refuse_unusable_root(fs, path, cfg.uri)
        raise PlanError(f"input {cfg.uri!r} does not exist (pass a directory, a glob, or a manifest file)")
    if info.get("type") == "directory":
        found = storage.with_retries(
            lambda: fs.find(path, detail=True, withdirs=True), what=f"list {cfg.uri}"
        )
        return _listing_rows(fs, found, cfg, root=path)
    if path.lower().endswith(MANIFEST_SUFFIXES):
        return _manifest_rows(fs, path)
    if _has_extension(path, cfg.extensions):
        return _listing_rows(fs, {path: info}, cfg)
    raise PlanError(
        f"input {cfg.uri!r} is a file that is neither a video ({', '.join(cfg.extensions)}) "
        f"nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
    )


def _refuse_unusable_root(fs: Any, path: str, uri: str) -> None:
    problem = storage.root_problem(fs, path)
    if problem is not None:
        raise PlanError(f"input {uri!r}: {problem} (check input.uri and input.storage_options)")


def _info_or_none(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def make_plan(rows: list[dict[str, Any]], shard_size: int) -> pa.Table:
    """Sort by uri, drop duplicate URIs, assign ids and shards. Deterministic for the same rows."""
    if not rows:
        return PLAN_SCHEMA.empty_table()
    by_uri: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_uri.setdefault(row["uri"], row)
    if len(by_uri) < len(rows):
        log.warning("plan: dropped %d duplicate URIs", len(rows) - len(by_uri))
    uris = sorted(by_uri)
    ordered = [by_uri[u] for u in uris]
    return pa.table(
        {
            "uri": uris,
            "video_id": [video_id(u) for u in uris],
            "size_bytes": [r["size_bytes"] for r in ordered],
            "mtime": [r["mtime"] for r in ordered],
            "extra": [r["extra"] for r in ordered],
            "shard": [i // shard_size for i in range(len(uris))],
            "etag": [r.get("etag") for r in ordered],
            "generation": [0] * len(uris),
            "deleted": [False] * len(uris),
        },
        schema=PLAN_SCHEMA,
    )
