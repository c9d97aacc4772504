"""``OUTPUT/_job.json``: what a job is (settings, model, label map, versions), and the guard that keeps
one OUTPUT to one job.

Written before any work starts, so an unwritable output fails in seconds, not after hours. A later run
into the same OUTPUT must agree on every output-affecting setting and on the model's identity; it may
change execution settings (actors, batch size, cluster address).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

from videoindex import __version__, storage
from videoindex.config import JobConfig, output_affecting, to_dict
from videoindex.format.layout import JOB_FILE, SCHEMA_VERSION, TABLES

MODEL_IDENTITY = ("name", "revision", "weights_sha256", "random_weights", "tag")


class JobMismatchError(RuntimeError):
    """OUTPUT already holds a different job."""


def model_record(info: Any) -> dict[str, Any]:
    record = {
        "name": info.name,
        "revision": info.revision,
        "weights_sha256": info.weights_sha256,
        "random_weights": info.random_weights,
        "tag": info.tag,
        "num_labels": info.num_labels,
        "embed_dim": info.embed_dim,
        "num_frames": info.num_frames,
        "pooling": info.pooling,
        "id2label": {str(k): v for k, v in sorted(info.id2label.items())},
        "config": info.config,
        "preprocess": dataclasses.asdict(info.preprocess),
    }
    if info.random_weights:
        record["warning"] = (
            "RANDOM WEIGHTS: labels and embeddings are meaningless; for demos and benchmarks only"
        )
    return record


def job_record(config: JobConfig, info: Any, videos: int, shards: int) -> dict[str, Any]:
    return {
        "videoindex_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "config": to_dict(config),
        "model": model_record(info),
        "plan": {"videos": videos, "shards": shards, "shard_size": config.output.shard_size},
    }


def generations(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The index's generations, oldest first: the first run, then each ``run --update`` (when, and how many
    videos were new, changed and deleted). Records written before updates existed imply the first one."""
    found = record.get("generations")
    if found:
        return list(found)
    return [{"generation": 0, "at": record.get("created_at"), "videos": record.get("plan", {}).get("videos")}]


def generation_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What status, query summary and the report show of the index's generation and last update."""
    last = generations(record)[-1]
    updated = int(last.get("generation", 0)) > 0
    return {
        "generation": int(last.get("generation", 0)),
        "last_update": last.get("at") if updated else None,
        "last_update_counts": {k: last.get(k) for k in ("new", "changed", "deleted")} if updated else None,
    }


def describe_changes(counts: dict[str, Any]) -> str:
    """An update's counts as status and the CLI print them."""
    return f"{counts['new']} new, {counts['changed']} changed, {counts['deleted']} deleted"


def read_job(fs: Any, root: str) -> dict[str, Any] | None:
    path = storage.join(root, JOB_FILE)
    return storage.read_json(fs, path) if storage.exists(fs, path) else None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"  {key}: existing {old.get(key)!r}, now {new.get(key)!r}")
    return diffs


def check_compatible(existing: dict[str, Any], config: JobConfig, info: Any, root_uri: str) -> None:
    """Refuse to mix two jobs in one OUTPUT, listing what differs."""
    old = output_affecting(existing.get("config", {}))
    new = output_affecting(to_dict(config))
    old_model = {f"model.{k}": existing.get("model", {}).get(k) for k in MODEL_IDENTITY}
    new_model = {f"model.{k}": model_record(info).get(k) for k in MODEL_IDENTITY}
    diffs = _differences(old, new) + _differences(old_model, new_model)
    if diffs:
        raise JobMismatchError(
            f"{root_uri} already holds a job with other settings; refusing to mix two jobs in one output.\n"
            + "\n".join(diffs)
            + "\nUse a new output directory, or `videoindex resume OUTPUT` to continue the existing job."
        )


def refuse_foreign_tables(fs: Any, root: str, root_uri: str) -> None:
    """An OUTPUT with tables but no _job.json belongs to something else: never write into it."""
    for name in (*TABLES, "_ledger"):  # a lone _plan/ is a plan whose _job.json was never written
        if storage.exists(fs, storage.join(root, name)):
            raise JobMismatchError(
                f"{root_uri} holds '{name}/' but no {JOB_FILE}: it is not a videoindex output of this job "
                "(or its _job.json was deleted). Use an empty output directory."
            )
