"""What a resume needs from an output alone: the job's config (secrets re-supplied) and the failed videos.

Plain Python over ``_job.json`` and the committed ``videos`` rows (compacted or not); the job (job/run.py) queues the result.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from videoindex import storage
from videoindex.config import JobConfig, load_config
from videoindex.format.compaction import arrow_filesystem, committed_files, read_manifest
from videoindex.format.errortypes import RETRYABLE_ERROR_TYPES
from videoindex.format.jobrecord import JOB_FILE, read_job
from videoindex.format.schemas import VIDEOS_SCHEMA


def failed_videos(
    fs: Any, root: str, shards: dict[int, tuple[int, int]], *, all_errors: bool
) -> dict[int, tuple[str, ...]]:
    """Video ids with status=error per committed shard ({shard: its commit}, from
    ``LedgerView.committed_commits``; retryable error types only, unless all_errors)."""
    if not shards:
        return {}
    files = committed_files(fs, root, "videos", shards, read_manifest(fs, root))
    dataset = files.dataset(arrow_filesystem(fs), VIDEOS_SCHEMA.append(pa.field("shard", pa.int32())))
    rows = dataset.to_table(columns=["video_id", "status", "error_type", "shard"]).to_pylist()
    found: dict[int, list[str]] = {}
    for row in rows:
        if row["status"] == "error" and (all_errors or row["error_type"] in RETRYABLE_ERROR_TYPES):
            found.setdefault(int(row["shard"]), []).append(row["video_id"])
    return {s: tuple(sorted(ids)) for s, ids in found.items()}


def _without_redacted(options: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_redacted(v) if isinstance(v, dict) else v for k, v in options.items() if v != "***"}


def job_config_from_output(
    output: str, storage_options: dict[str, Any] | None = None, **overrides: Any
) -> JobConfig:
    """Rebuild a job's config from its _job.json (for resume); secrets come from storage_options."""
    fs, root = storage.filesystem(output, storage_options)
    record = read_job(fs, root)
    if record is None:
        raise FileNotFoundError(f"{output} has no {JOB_FILE}: not a videoindex output")
    flat: dict[str, Any] = {}
    for section, values in record["config"].items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    flat["output.uri"] = output
    flat["input.update"] = flat["input.allow_mass_delete"] = False  # a resume finishes the plan in force
    for side in ("input", "output"):  # secrets were redacted in _job.json: never reuse the "***" placeholders
        kept = _without_redacted(flat.get(f"{side}.storage_options") or {})
        flat[f"{side}.storage_options"] = {**kept, **(storage_options or {})}
    flat.update({k: v for k, v in overrides.items() if v is not None})
    return load_config(None, flat)
