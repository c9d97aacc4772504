"""Table schemas: the contract every reader (query, report, Spark, DuckDB) relies on.

One module-level schema per table (the clips schema depends on the model's label count and embedding
width). Never inferred from data: an empty shard writes the same columns as a full one.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"


def clips_schema(num_labels: int, embed_dim: int) -> pa.Schema:
    """One row per clip. Logits and embedding are fixed-size float32 lists (model-dependent sizes)."""
    return pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("clip_index", pa.int32(), nullable=False),
            pa.field("temporal_view", pa.int16(), nullable=False),
            pa.field("spatial_crop", pa.int16(), nullable=False),
            pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),
            pa.field("start_frame", pa.int32(), nullable=False),
            pa.field("end_frame", pa.int32(), nullable=False),  # last sampled frame, inclusive
            pa.field("start_s", pa.float64(), nullable=False),
            pa.field("end_s", pa.float64(), nullable=False),  # end of the last sampled frame
            pa.field("padded", pa.bool_(), nullable=False),  # video shorter than a clip: indices repeat
            pa.field("label", pa.string(), nullable=False),
            pa.field("label_id", pa.int32(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),  # softmax probability of label
            pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
            pa.field("logits", pa.list_(pa.float32(), num_labels), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), embed_dim), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("thumbnail", pa.binary(), nullable=True),  # JPEG of the middle frame, if enabled
        ]
    )


VIDEOS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", pa.string()),  # modification time or etag as listed, ISO 8601 when a time
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("frames", pa.int64()),
        pa.field("width", pa.int32()),  # after rotation
        pa.field("height", pa.int32()),
        pa.field("rotation", pa.int16()),  # degrees, as in the container metadata
        pa.field("codec", pa.string()),
        pa.field("decoder", pa.string()),  # the decoder that produced the clips (decord | pyav)
        pa.field("num_clips", pa.int32(), nullable=False),
        pa.field("label", pa.string()),  # video level: argmax of averaged clip probabilities
        pa.field("label_id", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("extra", pa.string()),  # JSON of manifest columns other than uri
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # open | probe | decode | infer
        pa.field("decoder", pa.string()),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error_message", pa.string(), nullable=False),
        pa.field("fatal", pa.bool_(), nullable=False),  # false: recovered (e.g. decord failed, PyAV worked)
    ]
)

PLAN_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", pa.string()),
        pa.field("extra", pa.string()),
        pa.field("shard", pa.int32(), nullable=False),
        # Added by `run --update` (plans written before it read these as null): the object's ETag as listed,
        # the plan generation that last added, changed or deleted the row, and whether the input is gone.
        pa.field("etag", pa.string()),
        pa.field("generation", pa.int32()),
        pa.field("deleted", pa.bool_()),
    ]
)
