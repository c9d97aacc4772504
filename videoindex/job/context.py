"""The facts of a job, resolved once on the driver and shipped to every worker (Ray: once per actor).

Nothing here is re-derived on the way: the model is resolved and its weights hashed once, the decode
settings are built once, the plan's counts are carried. Executors add how they split the work
(``sizing.ExecutionSplit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from videoindex.config import JobConfig
from videoindex.stages.checkpoint import ModelInfo
from videoindex.stages.decode import DecodeSettings


@dataclass(frozen=True)
class JobContext:
    config: JobConfig
    model: ModelInfo
    settings: DecodeSettings
    output_uri: str
    videos: int  # to decode in this run (a retry of failed videos: only those)
    shards: int  # planned


def decode_settings(config: JobConfig, model: ModelInfo) -> DecodeSettings:
    return DecodeSettings(
        sampling=config.sampling, decode=config.decode, preprocess=model.preprocess, clip_len=model.num_frames,
        storage_options=dict(config.input.storage_options), thumbnails=config.output.thumbnails,
    )  # fmt: skip
