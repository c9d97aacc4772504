"""Model stage: a VideoMAE video classifier as a callable, loaded once per process.

``resolve_model`` runs on the driver before any work: it finds the checkpoint (local directory or hub
snapshot), checks that it is a VideoMAE *classifier*, hashes its weights and resolves preprocessing, so a
job that cannot load its model fails in seconds with a message saying what to do. ``VideoClassifier``
then turns ``uint8[B,T,S,S,3]`` crops into float32 logits, probabilities, top-k and pooled embeddings;
the same object runs in a plain loop in tests and inside the Ray actor.

Random weights (``--random-weights``) keep the architecture and the label map but initialise every
parameter from seed 0, so every actor and every run computes bit-identical (meaningless) outputs; the
``model`` column of every row says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from videoindex.config import DEFAULT_MODEL, ConfigError, ModelConfig, PreprocessConfig
from videoindex.preprocess import PreprocessSpec, load_preprocess_spec, normalize

log = logging.getLogger(__name__)

RANDOM_SEED = 0
HUB_TIMEOUT_S = 5.0  # per hub metadata request: an offline machine fails in seconds, not minutes
META_FILES = ["config.json", "preprocessor_config.json"]
SAFETENSORS_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
PACKAGED_CONFIGS = {DEFAULT_MODEL: "videomae-small-finetuned-ssv2"}  # under videoindex/assets/


class ModelLoadError(RuntimeError):
    """The model cannot be loaded here; the message says how to get it (local dir or random weights)."""


@dataclass(frozen=True)
class ModelInfo:
    """Everything a job records about its model; resolved once on the driver, shipped to every actor."""

    name: str
    revision: str | None
    weights_sha256: str | None  # over the weight files' bytes, in name order; None for random weights
    random_weights: bool
    model_dir: str | None  # local directory holding config.json (and the weights)
    id2label: dict[int, str]
    num_labels: int
    embed_dim: int
    num_frames: int
    image_size: int
    tubelet_size: int
    pooling: Literal["mean", "cls"]
    config: dict[str, Any]  # effective VideoMAE config (JSON-able), after config_overrides
    preprocess: PreprocessSpec
    tag: str  # the `model` column of every table row


@dataclass
class ClipOutputs:
    """One batch of B clips; float32 throughout, whatever dtype the model ran in."""

    logits: np.ndarray  # float32[B,L]
    embeddings: np.ndarray  # float32[B,D]: pooled features that feed the classifier
    probs: np.ndarray  # float32[B,L]: softmax of logits
    topk_ids: np.ndarray  # int32[B,k], best first
    topk_scores: np.ndarray  # float32[B,k]: probabilities of topk_ids


# ---------------------------------------------------------------------------------------------- resolve


def _hub_message(name: str, cause: BaseException) -> str:
    return (
        f"cannot load model {name!r} from the Hugging Face hub ({type(cause).__name__}: {cause}).\n"
        "The hub could not be reached, or the repository/revision does not exist, and it is not in the "
        "local HF cache. Either:\n"
        "  - pass a local checkpoint directory: --model /path/to/dir (with config.json and "
        "model.safetensors or pytorch_model.bin), e.g. made on a machine with network by\n"
        f"      huggingface-cli download {name} --local-dir /path/to/dir\n"
        "  - or run a demo with --random-weights (same architecture, seeded random weights; labels are "
        "meaningless)."
    )


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _resolve_revision(repo_id: str, revision: str | None) -> tuple[str | None, Exception | None]:
    """(commit hash, None) from the hub with a short timeout, or (revision, error) when unreachable.

    huggingface_hub's own revision lookup has no timeout; a commit hash makes snapshot_download skip it.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().repo_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S).sha, None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as exc:  # network down, timeout, hub error: the local cache may still have it
        log.warning(
            "hub unreachable for %s (%s: %s); looking in the local HF cache", repo_id, type(exc).__name__, exc
        )
        return revision, exc


def _snapshot(repo_id: str, revision: str | None, with_weights: bool) -> Path:
    """Hub snapshot of config (+ weights: safetensors, else .bin); from the HF cache when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if _hub_offline():
        network_error: Exception | None = ConnectionError("HF_HUB_OFFLINE is set")
    else:
        revision, network_error = _resolve_revision(repo_id, revision)
    kwargs = dict(revision=revision, etag_timeout=HUB_TIMEOUT_S, local_files_only=network_error is not None)
    try:
        patterns = META_FILES + (SAFETENSORS_FILES if with_weights else [])
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        if with_weights and not _weight_files(folder):
            folder = Path(snapshot_download(repo_id, allow_patterns=META_FILES + BIN_FILES, **kwargs))
    except LocalEntryNotFoundError as exc:
        if network_error is None:
            raise
        raise ConnectionError(f"{network_error!r}; not in the local HF cache either") from exc
    return folder


def _packaged_config_dir(name: str) -> Path:
    # The package is installed as plain files (setuptools package-data), so the resource is a directory.
    return Path(str(resources.files("videoindex") / "assets" / PACKAGED_CONFIGS[name]))


def _locate(cfg: ModelConfig) -> Path:
    """The local directory holding the checkpoint's config.json (and weights unless random)."""
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        return local.resolve()
    if cfg.name.startswith(("/", ".", "~")) or cfg.name.count("/") > 1:
        raise ModelLoadError(
            f"model directory {cfg.name!r} does not exist (--model takes a hub id or a local "
            "checkpoint directory with config.json)"
        )
    try:
        return _snapshot(cfg.name, cfg.revision, with_weights=not cfg.random_weights)
    except Exception as exc:
        if cfg.random_weights and cfg.name in PACKAGED_CONFIGS:
            log.warning("%s not reachable (%s); random weights use the packaged config", cfg.name, exc)
            return _packaged_config_dir(cfg.name)
        if cfg.random_weights:
            raise ModelLoadError(
                f"cannot fetch the config of {cfg.name!r} from the hub ({type(exc).__name__}: "
                f"{exc}); random weights still need the architecture: pass --model "
                "/path/to/dir with its config.json"
            ) from exc
        raise ModelLoadError(_hub_message(cfg.name, exc)) from exc


def _weight_files(folder: Path) -> list[Path]:
    """The files from_pretrained will read: safetensors if any, else pytorch .bin (sharded or not)."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = f"{single}.index.json"
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return [folder / shard for shard in sorted(shards)]
    return []


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _effective_config(folder: Path, overrides: Mapping[str, Any]) -> Any:
    """config.json + overrides as a VideoMAEConfig, refusing anything that is not a VideoMAE classifier."""
    from transformers import VideoMAEConfig

    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{folder}: no config.json; a checkpoint directory needs config.json and weights"
        )
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "videomae":
        raise ModelLoadError(
            f"{path}: model_type is {raw.get('model_type')!r}; videoindex runs VideoMAE "
            "video classifiers (model_type 'videomae')"
        )
    archs = raw.get("architectures") or []
    if (archs and "VideoMAEForVideoClassification" not in archs) or not raw.get("id2label"):
        raise ModelLoadError(
            f"{path}: not a video classification checkpoint (architectures {archs}, "
            f"{len(raw.get('id2label') or {})} labels); use a fine-tuned VideoMAE "
            "(VideoMAEForVideoClassification with id2label), not a pre-training one"
        )
    unknown = sorted(set(overrides) - set(VideoMAEConfig().to_dict()))
    if unknown:
        raise ConfigError(f"model.config_overrides: unknown VideoMAE config key(s) {unknown}")
    return VideoMAEConfig.from_dict({**raw, **overrides})


def _tag(cfg: ModelConfig) -> str:
    tag = cfg.name + (f"@{cfg.revision}" if cfg.revision else "")
    return tag + (f" [RANDOM WEIGHTS seed={RANDOM_SEED}]" if cfg.random_weights else "")


def resolve_model(cfg: ModelConfig, preprocess: PreprocessConfig) -> ModelInfo:
    """Find, check and describe the model without building it (cheap: reads JSON, hashes weights)."""
    folder = _locate(cfg)
    config = _effective_config(folder, cfg.config_overrides)
    weights = [] if cfg.random_weights else _weight_files(folder)
    if not cfg.random_weights and not weights:
        raise ModelLoadError(
            f"{folder}: no weights (model.safetensors or pytorch_model.bin); download the "
            "checkpoint there, or run a demo with --random-weights"
        )
    spec = load_preprocess_spec(folder, preprocess)
    if spec.crop_size != config.image_size:
        raise ConfigError(
            f"preprocess.crop_size {spec.crop_size} differs from the model's image_size "
            f"{config.image_size}; VideoMAE's position embeddings fix the input size"
        )
    return ModelInfo(
        name=cfg.name,
        revision=cfg.revision,
        weights_sha256=_sha256(weights) if weights else None,
        random_weights=cfg.random_weights,
        model_dir=str(folder),
        id2label={int(k): str(v) for k, v in config.id2label.items()},
        num_labels=config.num_labels,
        embed_dim=config.hidden_size,
        num_frames=config.num_frames,
        image_size=config.image_size,
        tubelet_size=config.tubelet_size,
        pooling="mean" if config.use_mean_pooling else "cls",
        config=json.loads(config.to_json_string(use_diff=False)),
        preprocess=spec,
        tag=_tag(cfg),
    )


# ------------------------------------------------------------------------------------------------- run


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device} but no CUDA device is visible here; use auto or cpu")
    return torch.device(device)


def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _build(info: ModelInfo, dtype: torch.dtype) -> torch.nn.Module:
    """Pretrained weights (every tensor must load), or seeded random ones identical in every process."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig.from_dict(info.config)
    if info.random_weights:
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):  # built on CPU in float32: same bits everywhere
            torch.manual_seed(RANDOM_SEED)
            model = VideoMAEForVideoClassification(config)
        return model.to(dtype)
    # transformers >= 5 renames legacy `q_bias`/`v_bias` keys itself (conversion_mapping "videomae");
    # a missing key would leave a randomly initialised tensor, so it is an error, not a warning.
    model, report = VideoMAEForVideoClassification.from_pretrained(
        info.model_dir, config=config, attn_implementation="sdpa", dtype=dtype, output_loading_info=True
    )
    missing = sorted(report["missing_keys"]) + sorted(str(k) for k in report["mismatched_keys"])
    if missing:
        raise ModelLoadError(
            f"{info.model_dir}: checkpoint does not fit the model; missing or mis-shaped "
            f"weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if report["unexpected_keys"]:
        log.warning(
            "%s: ignoring %d unused weights, e.g. %s",
            info.model_dir,
            len(report["unexpected_keys"]),
            sorted(report["unexpected_keys"])[:3],
        )
    return model


class VideoClassifier:
    """Callable: ``uint8[B,T,S,S,3]`` crops -> :class:`ClipOutputs`. Build once per process."""

    def __init__(self, info: ModelInfo, cfg: ModelConfig, device: str | None = None) -> None:
        self.info = info
        self.device = _pick_device(device or cfg.device)
        self.dtype = _pick_dtype(cfg.dtype, self.device)
        self.top_k = min(cfg.top_k, info.num_labels)
        self.model = _build(info, self.dtype).to(self.device).eval()
        self._encoder = self.model.videomae
        if cfg.compile and self.device.type == "cuda":
            self._encoder = torch.compile(self._encoder)
        elif cfg.compile:
            log.info("model.compile ignored on %s (pays off on CUDA only)", self.device)
        log.info("loaded %s on %s (%s)", info.tag, self.device, str(self.dtype).removeprefix("torch."))

    @torch.inference_mode()
    def forward_pixels(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) exactly as VideoMAEForVideoClassification.forward pools and classifies."""
        seq = self._encoder(pixel_values).last_hidden_state
        pooled = self.model.fc_norm is not None  # use_mean_pooling; else the first token, as HF does
        embedding = self.model.fc_norm(seq.mean(1)) if pooled else seq[:, 0]
        return self.model.classifier(embedding), embedding

    def _check(self, clips: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = torch.from_numpy(np.ascontiguousarray(clips)) if isinstance(clips, np.ndarray) else clips
        size, frames = self.info.preprocess.crop_size, self.info.num_frames
        if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != (frames, size, size, 3):
            raise ValueError(
                f"expected uint8[B,{frames},{size},{size},3] clips, got {batch.dtype}{list(batch.shape)}"
            )
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # lets the copy in normalize() run asynchronously
        return batch

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray | torch.Tensor) -> ClipOutputs:
        pixel_values = normalize(self._check(clips), self.info.preprocess, self.dtype, self.device)
        logits, embeddings = self.forward_pixels(pixel_values)
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        scores, ids = probs.topk(self.top_k, dim=-1)
        return ClipOutputs(
            logits=logits.cpu().numpy(),
            embeddings=embeddings.float().cpu().numpy(),
            probs=probs.cpu().numpy(),
            topk_ids=ids.to(torch.int32).cpu().numpy(),
            topk_scores=scores.cpu().numpy(),
        )


class ModelThread:
    """Runs a classifier on one dedicated thread, whichever threads call it, one batch at a time.

    libgomp (PyTorch's OpenMP on Linux) gives every thread that runs a parallel op its own team of
    ``torch_threads``. With more team threads alive than cores (a Ray actor running shards on several
    threads), it stops spinning at barriers and sleeps at each one: measured on 2 cores, 445 instead of
    3 sleeps per forward and a 10-15% slower model (benchmarks/README.md). One thread keeps one team.
    ``build`` runs on that thread too, so the model's first parallel ops make no team elsewhere.
    """

    def __init__(self, build: Callable[[], VideoClassifier], torch_threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="videoindex-model")
        self.classifier = self._executor.submit(self._build, build, torch_threads).result()
        self.info = self.classifier.info

    @staticmethod
    def _build(build: Callable[[], VideoClassifier], torch_threads: int) -> VideoClassifier:
        torch.set_num_threads(torch_threads)
        return build()

    def __call__(self, clips: np.ndarray | torch.Tensor) -> ClipOutputs:
        return self._executor.submit(self.classifier, clips).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
