"""Tabulate: a shard's decoded and classified videos -> its three tables (clips, videos, errors).

Requires one ``VideoRecord`` per video of the shard (its plan, clip rows with model outputs, or the error
that stopped it) and the model's label map. Produces pyarrow tables with the schemas of ``format.schemas``,
rows sorted by uri then clip index, so a shard's files are the same whatever the timing of the run.
Each clip's outputs are a ``ClipRow``; columns are built once per table, never inferred from rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from videoindex.format.plans import VideoTask
from videoindex.format.schemas import ERRORS_SCHEMA, STATUS_ERROR, STATUS_OK, VIDEOS_SCHEMA, clips_schema
from videoindex.stages.errors import DecodeError
from videoindex.stages.sampling import ClipSpec
from videoindex.stages.video import VideoMeta


@dataclass
class ClipRow:
    """One clip: where it is in the video, and (once the model ran) its outputs."""

    spec: ClipSpec
    start_s: float
    end_s: float
    thumbnail: bytes | None = None
    logits: np.ndarray | None = None  # float32[L]
    embedding: np.ndarray | None = None  # float32[D]
    probs: np.ndarray | None = None  # float32[L]
    topk_ids: np.ndarray | None = None  # int32[k]
    topk_scores: np.ndarray | None = None  # float32[k]


@dataclass
class VideoRecord:
    """What a shard learns about one of its videos while it is indexed."""

    task: VideoTask
    meta: VideoMeta | None = None
    size_bytes: int | None = None
    clips: list[ClipRow] = field(default_factory=list)
    error: DecodeError | None = None
    recovered: list[DecodeError] = field(default_factory=list)


def shard_tables(records: Iterable[VideoRecord], info: Any) -> dict[str, pa.Table]:
    """The shard's three tables; ``info``: the model's ModelInfo (label map, sizes, tag)."""
    ordered = sorted(records, key=lambda r: r.task.uri)
    return {"clips": clips_table(ordered, info), "videos": videos_table(ordered, info),
            "errors": errors_table(ordered)}  # fmt: skip


def clips_table(records: list[VideoRecord], info: Any) -> pa.Table:
    schema = clips_schema(info.num_labels, info.embed_dim)
    rows = [
        (r, c) for r in records if r.error is None for c in sorted(r.clips, key=lambda c: c.spec.clip_index)
    ]
    if not rows:
        return schema.empty_table()
    labels = info.id2label
    ids = [[int(i) for i in c.topk_ids] for _, c in rows]
    columns = {
        "video_id": [r.task.video_id for r, _ in rows],
        "uri": [r.task.uri for r, _ in rows],
        "clip_index": [c.spec.clip_index for _, c in rows],
        "temporal_view": [c.spec.temporal_view for _, c in rows],
        "spatial_crop": [c.spec.spatial_crop for _, c in rows],
        "frame_indices": [list(c.spec.frame_indices) for _, c in rows],
        "start_frame": [c.spec.frame_indices[0] for _, c in rows],
        "end_frame": [c.spec.frame_indices[-1] for _, c in rows],
        "start_s": [c.start_s for _, c in rows],
        "end_s": [c.end_s for _, c in rows],
        "padded": [c.spec.padded for _, c in rows],
        "label": [labels[k[0]] for k in ids],
        "label_id": [k[0] for k in ids],
        "score": [float(c.topk_scores[0]) for _, c in rows],
        "topk_labels": [[labels[i] for i in k] for k in ids],
        "topk_ids": ids,
        "topk_scores": [[float(s) for s in c.topk_scores] for _, c in rows],
        "logits": _fixed_lists([c.logits for _, c in rows], info.num_labels),
        "embedding": _fixed_lists([c.embedding for _, c in rows], info.embed_dim),
        "model": [info.tag] * len(rows),
        "thumbnail": [c.thumbnail for _, c in rows],
    }
    return pa.table(columns, schema=schema)


def _fixed_lists(vectors: list[np.ndarray | None], width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.stack(vectors).astype(np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _video_row(record: VideoRecord, info: Any) -> dict[str, Any]:
    meta = record.meta
    row: dict[str, Any] = {
        "video_id": record.task.video_id,
        "uri": record.task.uri,
        "size_bytes": record.size_bytes if record.size_bytes is not None else record.task.size_bytes,
        "mtime": record.task.mtime,
        "num_clips": 0,
        "status": STATUS_OK,
        "model": info.tag,
        "extra": record.task.extra,
    }
    if meta is not None:
        row.update(duration_s=meta.duration_s, fps=meta.fps, frames=meta.frames, width=meta.width,
                   height=meta.height, rotation=meta.rotation, codec=meta.codec, decoder=meta.decoder)  # fmt: skip
    if record.error is not None:
        row.update(status=STATUS_ERROR, error_type=record.error.error_type, error_message=str(record.error))
        return row
    if record.clips:  # video level: the argmax of the mean of its clips' probabilities
        mean = np.mean(np.stack([c.probs for c in record.clips]), axis=0)
        best = int(np.argmax(mean))
        row.update(
            num_clips=len(record.clips), label=info.id2label[best], label_id=best, score=float(mean[best])
        )
    return row


def videos_table(records: list[VideoRecord], info: Any) -> pa.Table:
    return pa.Table.from_pylist([_video_row(r, info) for r in records], schema=VIDEOS_SCHEMA)


def errors_table(records: list[VideoRecord]) -> pa.Table:
    rows = []
    for record in records:
        events = [(e, False) for e in record.recovered] + ([(record.error, True)] if record.error else [])
        for err, fatal in events:
            rows.append({"video_id": record.task.video_id, "uri": record.task.uri, "stage": err.stage,
                         "decoder": err.decoder, "error_type": err.error_type, "error_message": str(err),
                         "fatal": fatal})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
