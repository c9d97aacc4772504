"""Job configuration: frozen dataclasses, one per stage, loaded from YAML with CLI overrides.

Why frozen dataclasses: a config travels to Ray actors and into ``_job.json``; it must never change
under a running job, and every field must be visible in one place.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

DEFAULT_MODEL = "MCG-NJU/videomae-small-finetuned-ssv2"
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp", ".ogv",
)  # fmt: skip
SECRET_KEY_PARTS = ("secret", "token", "password", "key", "credential", "session", "connection_string",
                    "signature", "sas", "auth")  # fmt: skip


class ConfigError(ValueError):
    """A job configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class InputConfig:
    """Where videos come from: a directory or prefix (recursive), a glob, or a manifest file."""

    uri: str = ""
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    update: bool = False  # list again and index only what changed since the last run (job/update.py)
    allow_mass_delete: bool = False  # let an update delete more than half of the index


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames form a clip. Units: frames of the source video."""

    strategy: Literal["sliding", "uniform", "ssv2"] = "sliding"
    clip_stride: int = 4  # frames between sampled frames in sliding/uniform clips
    clips_per_video: int = 8  # uniform: clips spread over the video
    temporal_views: int = 2  # ssv2: temporal views of 16 segments each
    spatial_crops: int = 1  # ssv2: 1 (centre) or 3 (left/centre/right crops)
    max_clips_per_video: int | None = None


@dataclass(frozen=True)
class DecodeConfig:
    """How frames are read: PyAV's one forward pass by default (benchmarks/README.md, bench_decode.py);
    decord behind the same interface."""

    # pyav | decord | "package.module:open_function" (same signature as stages.video.open_video)
    decoder: str = "pyav"
    fallback_to_pyav: bool = True  # decord only: when decord cannot read a file PyAV can (recorded per video)
    # How a kept frame is cut down to the short side. rgb: converted to full-resolution RGB, then the
    # reference antialiased resize (the checkpoint's image processor's pixels, within one grey level).
    # swscale (pyav only): scaled in YUV by swscale as it is decoded, ~25% less decode CPU, about one
    # grey level off on camera video and more on saturated colour (benchmarks/README.md, bench_decode.py).
    scale: Literal["rgb", "swscale"] = "rgb"
    timeout_s: float = 600.0  # per step of a video's decode (its probe, then each chunk of clips)
    chunk_clips: int = 16  # clips decoded per task: bounds memory for long videos
    max_memory_mb: int = 4096  # per decode worker process; past it the video fails as out_of_memory


@dataclass(frozen=True)
class PreprocessConfig:
    """Overrides of the checkpoint's own preprocessor config; None keeps the checkpoint's value."""

    resize_short_side: int | None = None
    crop_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Which VideoMAE classification checkpoint runs, and how."""

    name: str = DEFAULT_MODEL  # hub id or local directory
    revision: str | None = None
    random_weights: bool = False  # same architecture, seeded random init; recorded everywhere
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    top_k: int = 5
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    compile: bool = False  # torch.compile the encoder (CUDA only pays off)


@dataclass(frozen=True)
class OutputConfig:
    """Where the tables go and how they are cut."""

    uri: str = ""
    shard_size: int = 64  # videos per shard; a shard is the unit of commit and retry
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    clips_row_group_size: int = 8192
    thumbnails: bool = False  # store one small JPEG per clip (middle frame) in the clips table
    # At a job's end, copy the videos and errors rows (and the clip embeddings, below) of committed shards
    # into a few large files (format/compaction.py) once this many shards are not compacted yet; 0: never
    # (`videoindex compact`).
    compact_min_shards: int = 64
    # Compaction also copies each clip's embedding (and the columns `query similar` returns) into a few
    # large files: a nearest-neighbour search then reads those instead of every shard's clips file, at
    # the price of storing the embeddings twice. false: the next compaction drops the copies (`similar`
    # reads every clips file) and the one after deletes them.
    compact_embeddings: bool = True


@dataclass(frozen=True)
class ExecutionConfig:
    """Where and how the work runs. None means: decide from the resources (job/sizing.py)."""

    executor: Literal["ray", "local"] = "ray"  # local: this process + decode worker processes, no Ray
    address: str | None = None  # ray: None is a local Ray (or RAY_ADDRESS)
    actors: int | None = None
    # Decoding a clip costs ~4% of a full-size CPU forward (benchmarks/README.md): on CPU the model
    # takes the node minus two decode slots, and its torch threads round that up to every core.
    actor_num_cpus: float | None = None  # None: 1 with a GPU; on CPU the node's CPUs - 2 x decode_num_cpus
    actor_num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    decode_num_cpus: float = 0.25
    # Decode workers at idle CPU priority (Linux SCHED_IDLE) run only when a core is otherwise free, so
    # they never preempt a CPU model's threads (measured: e2e 5-7% faster, benchmarks/README.md).
    # None: on when the actors run the model on CPU, off with GPUs (there decoding is the bottleneck).
    decode_idle_priority: bool | None = None
    decode_in_flight: int = 4  # videos decoding at once per shard being processed (ray)
    # Decode tasks run on the model actor's node, so no clip crosses the network. None: when the actors
    # have GPUs (where a clip's 2.4 MB per GPU-millisecond would load the network); false lets decode
    # tasks use CPU-only nodes too.
    decode_on_actor_node: bool | None = None
    decode_chunks_ahead: int = 2  # chunks a video's decode may run ahead of the model (ray backpressure)
    decode_workers: int | None = None  # local: decode processes (None: 2 beside a CPU model, cores-1 on GPU)
    # A decode worker is replaced after this many tasks (0: never): decoders grow memory over thousands
    # of videos (benchmarks/bench_memory.py); a fresh worker costs ~2 s of CPU once per this many tasks.
    decode_max_calls: int = 200
    shards_per_actor: int = 2  # shards an actor works on at once (overlaps shard boundaries)
    batch_size: int | None = None  # None: 16 on CUDA, 1 on CPU (fastest per clip there)
    torch_threads: int | None = None  # None: the actor's num_cpus rounded up, at least 1
    max_attempts: int = 3  # per shard, for infrastructure failures (actor or node lost)
    heartbeat_s: float = 30.0  # a running shard attempt and the driver renew their ledger record this often
    checkpoint_every: int = 1000  # committed shards between ledger checkpoints (and one at the end of a run)
    progress: bool = True


@dataclass(frozen=True)
class JobConfig:
    """A whole indexing job; the unit written to ``_job.json``."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def replace(self, **sections: Any) -> JobConfig:
        return dataclasses.replace(self, **sections)


# Settings that change what lands in the tables. A job may be resumed with other execution settings,
# but never with other values of these.
INPUT_RUN_ONLY = ("storage_options", "update", "allow_mass_delete")  # how this run lists, not what is indexed
OUTPUT_AFFECTING = ("input", "sampling", "decode.decoder", "decode.fallback_to_pyav", "decode.scale", "preprocess",
                    "model")  # fmt: skip


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, with a message naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{where}: a value is required")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        item = args[0] if args else Any
        return tuple(_convert(item, v, where) for v in value)
    if origin in (Mapping, dict) or tp is Mapping:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}"
                )
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _convert(tp, value, path)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"override {dotted!r}: use SECTION.KEY, e.g. model.top_k")
    tree.setdefault(section, {})[key] = value


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config (optional) and apply dotted-key overrides (CLI flags win), then validate."""
    tree: dict[str, Any] = {}
    if path:
        import fsspec

        with fsspec.open(path, "r") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a job config is a mapping of sections, got {type(loaded).__name__}")
        tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in loaded.items()}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    config = _build(JobConfig, tree, "")
    validate(config)
    return config


def validate(config: JobConfig) -> None:
    """Refuse settings that cannot work, saying which key to change."""
    s, d, x, o = config.sampling, config.decode, config.execution, config.output
    checks = [
        (config.input.uri != "", "input.uri: no input given (a directory, glob, or manifest file)"),
        (o.uri != "", "output.uri: no output directory given"),
        (s.clip_stride >= 1, "sampling.clip_stride must be >= 1 frame"),
        (s.clips_per_video >= 1, "sampling.clips_per_video must be >= 1"),
        (s.temporal_views >= 1, "sampling.temporal_views must be >= 1"),
        (s.spatial_crops in (1, 3), "sampling.spatial_crops must be 1 or 3"),
        (
            s.max_clips_per_video is None or s.max_clips_per_video >= 1,
            "sampling.max_clips_per_video must be >= 1",
        ),
        (
            d.decoder in ("pyav", "decord") or ":" in d.decoder,
            "decode.decoder must be pyav, decord or module:function",
        ),
        (d.timeout_s > 0, "decode.timeout_s must be > 0 seconds"),
        (d.scale == "rgb" or d.decoder != "decord", "decode.scale swscale needs decode.decoder pyav"),
        (d.chunk_clips >= 1, "decode.chunk_clips must be >= 1"),
        (config.model.top_k >= 1, "model.top_k must be >= 1"),
        (o.shard_size >= 1, "output.shard_size must be >= 1 video"),
        (
            o.compact_min_shards >= 0,
            "output.compact_min_shards must be >= 0 (0: never compact at a job's end)",
        ),
        (x.actors is None or x.actors >= 1, "execution.actors must be >= 1"),
        (x.batch_size is None or x.batch_size >= 1, "execution.batch_size must be >= 1"),
        (x.max_attempts >= 1, "execution.max_attempts must be >= 1"),
        (x.heartbeat_s > 0, "execution.heartbeat_s must be > 0 seconds"),
        (x.checkpoint_every >= 1, "execution.checkpoint_every must be >= 1 shard"),
        (x.decode_in_flight >= 1, "execution.decode_in_flight must be >= 1"),
        (x.decode_chunks_ahead >= 1, "execution.decode_chunks_ahead must be >= 1"),
        (x.decode_workers is None or x.decode_workers >= 1, "execution.decode_workers must be >= 1"),
        (
            x.decode_max_calls >= 0,
            "execution.decode_max_calls must be >= 0 (0: never replace a decode worker)",
        ),
        (x.shards_per_actor >= 1, "execution.shards_per_actor must be >= 1"),
        (
            (x.actor_num_cpus is None or x.actor_num_cpus >= 0) and x.decode_num_cpus > 0,
            "execution: num_cpus must be positive",
        ),
        (all(e.startswith(".") for e in config.input.extensions), "input.extensions: write them as '.mp4'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """--storage-option KEY=VALUE pairs; a VALUE that parses as JSON is used as such (numbers, objects)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option {pair!r}: use KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options safe to print or store: values of secret-looking keys are replaced."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif any(part in key.lower() for part in SECRET_KEY_PARTS) and key.lower() not in ("key_prefix",):
            out[key] = "***"
        else:
            out[key] = value
    return out


def to_dict(config: JobConfig) -> dict[str, Any]:
    """The config as plain JSON-able data, secrets redacted."""
    data = dataclasses.asdict(config)
    data["input"]["storage_options"] = redact(config.input.storage_options)
    data["output"]["storage_options"] = redact(config.output.storage_options)
    return json.loads(json.dumps(data, default=list))


def output_affecting(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config dict that must match for a job to continue in an existing OUTPUT."""
    picked: dict[str, Any] = {}
    for dotted in OUTPUT_AFFECTING:
        section, _, key = dotted.partition(".")
        value = config_dict.get(section, {})
        if key:
            value = value.get(key) if isinstance(value, Mapping) else None
        if section == "input" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in INPUT_RUN_ONLY}
        picked[dotted] = value
    picked["output.shard_size"] = config_dict.get("output", {}).get("shard_size")
    picked["output.thumbnails"] = config_dict.get("output", {}).get("thumbnails")
    return picked
