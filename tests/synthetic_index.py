"""A synthetic but valid videoindex OUTPUT, written without Ray, a model or videos.

Why: the query layer must be tested (and benchmarked at a million clips) against files in the real
layout and schemas, with answers known in advance. Rows are deterministic for a given seed: logits and
embeddings are seeded Gaussian float32, ``label = argmax(logits)``, ``score = softmax(logits)[label]``.

One clip embedding is planted twice (video 0 clip 0 and the last clip of the last ok video) so that
``similar`` has a known exact answer; random 384-d Gaussian vectors are otherwise nearly orthogonal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np
import pyarrow as pa

from videoindex import storage
from videoindex.format import layout, schemas
from videoindex.format.ledger import TOTAL_KEYS, Ledger, attempt_key
from videoindex.format.tables import parquet_bytes, stats_from_tables

MODEL_TAG = "synthetic-videomae@seeded"
RUN = 1_700_000_000_000  # the ledger run that "wrote" the index
TOP_K = 5
FPS = 30.0
CLIP_SECONDS = 16 / FPS  # 16 sampled frames, stride 1 for simplicity
ERROR_TYPES = ("decode_error", "timeout", "unsupported_codec")
_VERBS = (
    "Pushing",
    "Pulling",
    "Putting",
    "Taking",
    "Holding",
    "Dropping",
    "Lifting",
    "Turning",
    "Moving",
    "Opening",
    "Closing",
    "Folding",
    "Spinning",
    "Tearing",
    "Throwing",
)
_OBJECTS = (
    "a cup",
    "a pen",
    "a book",
    "a phone",
    "a box",
    "a bottle",
    "a spoon",
    "paper",
    "a ball",
    "a key",
    "a shoe",
    "a towel",
)


def label_names(num_labels: int) -> dict[int, str]:
    """SSv2-like names ("Pushing a cup") so substring search has several hits per verb."""
    names = [f"{v} {o}" for v, o in itertools.product(_VERBS, _OBJECTS)]
    names += [f"Action {i:03d}" for i in range(len(names), num_labels)]
    return dict(enumerate(names[:num_labels]))


def _video_id(uri: str) -> str:
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _clip_rows(
    ok: list[dict[str, Any]], cpv: int, names: dict[int, str], rng: np.random.Generator, embed_dim: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Columns of the clips of the ok videos of one shard, and their softmax probabilities."""
    n = len(ok) * cpv
    logits = (rng.standard_normal((n, len(names)), dtype=np.float32) * 3).astype(np.float32)
    probs = _softmax(logits)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    label_id = top[:, 0]
    clip_index = np.tile(np.arange(cpv, dtype=np.int32), len(ok))
    start_frame = clip_index * 16
    return {
        "video_id": np.repeat([v["video_id"] for v in ok], cpv).tolist(),
        "uri": np.repeat([v["uri"] for v in ok], cpv).tolist(),
        "clip_index": clip_index,
        "temporal_view": np.zeros(n, np.int16),
        "spatial_crop": np.zeros(n, np.int16),
        "frame_indices": [list(range(s, s + 16)) for s in start_frame.tolist()],
        "start_frame": start_frame,
        "end_frame": start_frame + 15,
        "start_s": start_frame / FPS,
        "end_s": (start_frame + 16) / FPS,
        "padded": np.zeros(n, bool),
        "label": [names[i] for i in label_id.tolist()],
        "label_id": label_id.astype(np.int32),
        "score": probs[np.arange(n), label_id].astype(np.float32),
        "topk_labels": [[names[i] for i in row] for row in top.tolist()],
        "topk_ids": top.astype(np.int32).tolist(),
        "topk_scores": np.take_along_axis(probs, top, axis=1).tolist(),
        "logits": _fixed_list(logits),
        "embedding": _fixed_list(rng.standard_normal((n, embed_dim), dtype=np.float32)),
        "model": [MODEL_TAG] * n,
        "thumbnail": [None] * n,
    }, probs


def _video_rows(videos: list[dict[str, Any]], cpv: int, probs: np.ndarray, names: dict[int, str]) -> dict:
    """Video level label: argmax of the averaged clip probabilities, as the real job does."""
    rows = []
    ok_index = 0
    for v in videos:
        row = {
            **{f.name: None for f in schemas.VIDEOS_SCHEMA},
            "video_id": v["video_id"],
            "uri": v["uri"],
            "model": MODEL_TAG,
            "status": v["status"],
            "num_clips": 0,
        }
        if v["status"] == schemas.STATUS_OK:
            mean = probs[ok_index * cpv : (ok_index + 1) * cpv].mean(axis=0)
            ok_index += 1
            label_id = int(np.argmax(mean))
            row.update(
                num_clips=cpv,
                duration_s=v["duration_s"],
                fps=FPS,
                frames=int(v["duration_s"] * FPS),
                width=320,
                height=240,
                rotation=0,
                codec="h264",
                decoder="decord",
                size_bytes=10_000,
                label=names[label_id],
                label_id=label_id,
                score=float(mean[label_id]),
            )
        else:
            row.update(error_type=v["error_type"], error_message=f"synthetic {v['error_type']} failure")
        rows.append(row)
    return rows


def _write(fs: Any, path: str, table: pa.Table, metadata: dict[bytes, bytes], row_group_size: int) -> int:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, parquet_bytes(table, metadata, row_group_size))  # the job's own Parquet settings
    return table.num_rows


def _plan_videos(videos: int, shards: int, error_videos: int, clips_per_video: int, seed: int) -> list[dict]:
    """Videos sorted by uri, split into contiguous shards like the real plan."""
    rng = np.random.default_rng(seed + 1)
    failing = set(rng.choice(np.arange(1, videos), size=error_videos, replace=False).tolist())
    per_shard = -(-videos // shards)
    out = []
    for i in range(videos):
        uri = f"file:///data/videos/v{i:07d}.mp4"
        status = schemas.STATUS_ERROR if i in failing else schemas.STATUS_OK
        out.append(
            {
                "uri": uri,
                "video_id": _video_id(uri),
                "shard": i // per_shard,
                "status": status,
                "error_type": ERROR_TYPES[i % len(ERROR_TYPES)] if i in failing else None,
                "duration_s": clips_per_video * CLIP_SECONDS + 0.25 * (i % 4),
            }
        )
    return out


def _shard_tables(
    vids: list[dict], cpv: int, names: dict[int, str], rng: np.random.Generator, embed_dim: int,
    recovered_every: int = 0,
) -> dict[str, pa.Table]:  # fmt: skip
    ok = [v for v in vids if v["status"] == schemas.STATUS_OK]
    clip_cols, probs = _clip_rows(ok, cpv, names, rng, embed_dim)
    errors = [
        {
            "video_id": v["video_id"],
            "uri": v["uri"],
            "stage": "decode",
            "decoder": "decord",
            "error_type": v["error_type"],
            "error_message": f"synthetic {v['error_type']} failure",
            "fatal": True,
        }
        for v in vids
        if v["status"] != schemas.STATUS_OK
    ] + [
        {"video_id": v["video_id"], "uri": v["uri"], "stage": "open", "decoder": "decord",
         "error_type": "unsupported_codec", "error_message": f"decord cannot read {v['uri']}; PyAV did",
         "fatal": False}
        for v in ok if recovered_every and int(v["uri"][-11:-4]) % recovered_every == 0
    ]  # fmt: skip
    return {
        "clips": pa.table(clip_cols, schema=schemas.clips_schema(len(names), embed_dim)),
        "videos": pa.Table.from_pylist(_video_rows(vids, cpv, probs, names), schema=schemas.VIDEOS_SCHEMA),
        "errors": pa.Table.from_pylist(errors, schema=schemas.ERRORS_SCHEMA),
    }


def _plant_duplicate(target: pa.Table, source: np.ndarray) -> pa.Table:
    """`target` with the embedding of its last clip replaced by `source`."""
    values = _matrix(target["embedding"]).copy()
    values[-1] = source
    column = target.schema.get_field_index("embedding")
    return target.set_column(column, target.schema.field(column), _fixed_list(values))


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    emb = column.combine_chunks()
    return emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), -1)


def _job_record(
    root: str, names: dict[int, str], embed_dim: int, videos: int, shards: int, per_shard: int
) -> dict:
    model = {
        "name": "synthetic/videomae",
        "tag": MODEL_TAG,
        "random_weights": True,
        "revision": None,
        "num_labels": len(names),
        "embed_dim": embed_dim,
        "id2label": {str(k): v for k, v in names.items()},
    }
    config = {
        "input": {"uri": "file:///data/videos"},
        "output": {"uri": root, "shard_size": per_shard},
        "model": {"name": model["name"], "random_weights": True},
    }
    return {
        "videoindex_version": "synthetic",
        "schema_version": layout.SCHEMA_VERSION,
        "config": config,
        "model": model,
        "plan": {"videos": videos, "shards": shards, "shard_size": per_shard},
    }


def write_synthetic_index(
    root: str,
    *,
    videos: int,
    clips_per_video: int,
    num_labels: int = 174,
    embed_dim: int = 384,
    shards: int,
    seed: int = 0,
    fs: Any = None,
    uncommitted_shards: tuple[int, ...] = (),
    error_videos: int = 0,
    checkpoint: bool = True,
    counts_only: bool = False,
    recovered_every: int = 0,
) -> dict[str, Any]:
    """Write an OUTPUT at `root` (a URI, or a path inside `fs`); returns counts and known ids.

    Uncommitted shards get all their table files but no commit marker (a crash before commit). Every
    ``recovered_every``-th ok video also gets a recovered (non-fatal) error row.
    """
    if fs is None:
        fs, root = storage.filesystem(root)
    names = label_names(num_labels)
    plan = _plan_videos(videos, shards, error_videos, clips_per_video, seed)
    shards = plan[-1]["shard"] + 1
    per_shard = -(-videos // shards)
    rng = np.random.default_rng(seed)
    committed = [s for s in range(shards) if s not in uncommitted_shards]
    ok_shards = sorted({v["shard"] for v in plan if v["status"] == schemas.STATUS_OK} & set(committed))
    metadata = {
        b"videoindex.model": MODEL_TAG.encode(),
        b"videoindex.label_map": json.dumps({str(k): v for k, v in names.items()}).encode(),
    }
    job = _job_record(root, names, embed_dim, videos, shards, per_shard)
    storage.write_json(fs, storage.join(root, "_job.json"), job)
    ledger = Ledger(fs, root)
    clips, duplicate, source = 0, [], None
    by_shard = {s: list(group) for s, group in itertools.groupby(plan, key=lambda v: v["shard"])}
    for s in range(shards):  # one shard in memory at a time
        tables = _shard_tables(by_shard[s], clips_per_video, names, rng, embed_dim, recovered_every)
        if s == ok_shards[0]:
            source = _matrix(tables["clips"]["embedding"])[0]
            duplicate.append((tables["clips"]["video_id"][0].as_py(), 0))
        if s == ok_shards[-1]:
            tables["clips"] = _plant_duplicate(tables["clips"], source)
            duplicate.append(
                (tables["clips"]["video_id"][-1].as_py(), tables["clips"]["clip_index"][-1].as_py())
            )
        for name, table in tables.items():
            size = 8192 if name == "clips" else 65536
            _write(fs, storage.join(root, layout.table_file(name, s)), table, metadata, size)
        if s in committed:
            clips += tables["clips"].num_rows
            stats = {"shard": s, "attempt": 1, **stats_from_tables(tables)}
            if counts_only:  # as videoindex 0.1 wrote them: readers must read the tables
                stats = {k: v for k, v in stats.items() if k in ("shard", "attempt", *TOTAL_KEYS)}
            ledger.event(attempt_key(RUN, s + 1), s, 1, "committed", stats)
    if checkpoint:  # as a finished run leaves it: readers start from the checkpoint
        ledger.write_checkpoint(ledger.view())
    visible = [v for v in plan if v["shard"] in committed]
    return {
        "root": root,
        "shards": shards,
        "committed_shards": committed,
        "uncommitted_shards": sorted(uncommitted_shards),
        "videos": len(visible),
        "videos_ok": sum(v["status"] == schemas.STATUS_OK for v in visible),
        "videos_error": sum(v["status"] != schemas.STATUS_OK for v in visible),
        "clips": clips,
        "id2label": names,
        "video_ids": [v["video_id"] for v in visible],
        "uris": [v["uri"] for v in visible],
        "error_video_ids": [v["video_id"] for v in visible if v["status"] != schemas.STATUS_OK],
        "hidden_video_ids": [v["video_id"] for v in plan if v["shard"] not in committed],
        "duplicate": tuple(duplicate),  # ((video_id, clip_index), (video_id, clip_index))
        "model_tag": MODEL_TAG,
    }
