"""The checkpoint: find it, check it, describe it, fingerprint it. No torch, no transformers.

``resolve_model`` runs on the driver before any work: it finds the checkpoint (local directory or hub
snapshot), checks from its ``config.json`` that it is a VideoMAE *classifier*, hashes its weights and
resolves preprocessing, so a job that cannot load its model fails in seconds with a message saying what to
do, and the driver never imports torch (about 5 s on 2 cores). Workers build the model from the
``ModelInfo`` (``stages.model``) and check their copy of the weights by fingerprint (``verified_model``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from videoindex.config import DEFAULT_MODEL, ConfigError, ModelConfig, PreprocessConfig
from videoindex.stages.preprocess import PreprocessSpec, load_preprocess_spec

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
    weights_fingerprint: str | None  # sizes + first and last MiB of each weight file: a cheap check
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


FINGERPRINT_BYTES = 2**20


def _fingerprint(files: list[Path]) -> str:
    """Names, sizes and the first and last MiB of each file: what a worker checks instead of re-hashing
    every weight byte (the full sha256 is computed once, on the driver, and recorded)."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
            fh.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


# transformers' VideoMAEConfig: its keys (tests/test_model.py checks them against the installed
# transformers) and the defaults of the fields the driver reads, so the driver needs no transformers.
VIDEOMAE_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "attention_probs_dropout_prob", "chunk_size_feed_forward",
    "decoder_hidden_size", "decoder_intermediate_size", "decoder_num_attention_heads", "decoder_num_hidden_layers",
    "dtype", "hidden_act", "hidden_dropout_prob", "hidden_size", "id2label", "image_size", "initializer_range",
    "intermediate_size", "is_encoder_decoder", "label2id", "layer_norm_eps", "model_type", "norm_pix_loss",
    "num_attention_heads", "num_channels", "num_frames", "num_hidden_layers", "output_attentions",
    "output_hidden_states", "patch_size", "problem_type", "qv_bias", "return_dict", "transformers_version",
    "tubelet_size", "use_mean_pooling",
})  # fmt: skip
VIDEOMAE_DEFAULTS: Mapping[str, Any] = {"image_size": 224, "num_frames": 16, "tubelet_size": 2, "hidden_size": 768,
                                        "use_mean_pooling": True}  # fmt: skip


def _effective_config(folder: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """config.json + overrides, refusing anything that is not a VideoMAE classifier."""
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
    unknown = sorted(set(overrides) - VIDEOMAE_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"model.config_overrides: unknown VideoMAE config key(s) {unknown}")
    return {**raw, **overrides}


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
    field = {k: config.get(k, default) for k, default in VIDEOMAE_DEFAULTS.items()}
    if spec.crop_size != field["image_size"]:
        raise ConfigError(
            f"preprocess.crop_size {spec.crop_size} differs from the model's image_size "
            f"{field['image_size']}; VideoMAE's position embeddings fix the input size"
        )
    id2label = {int(k): str(v) for k, v in config["id2label"].items()}
    return ModelInfo(
        name=cfg.name,
        revision=cfg.revision,
        weights_sha256=_sha256(weights) if weights else None,
        weights_fingerprint=_fingerprint(weights) if weights else None,
        random_weights=cfg.random_weights,
        model_dir=str(folder),
        id2label=id2label,
        num_labels=len(id2label),
        embed_dim=int(field["hidden_size"]),
        num_frames=int(field["num_frames"]),
        image_size=int(field["image_size"]),
        tubelet_size=int(field["tubelet_size"]),
        pooling="mean" if field["use_mean_pooling"] else "cls",
        config=config,
        preprocess=spec,
        tag=_tag(cfg),
    )


def verified_model(info: ModelInfo, cfg: ModelConfig) -> ModelInfo:
    """The driver's ModelInfo where this machine holds the same checkpoint (cheap fingerprint check), else
    the checkpoint resolved here (hub snapshot) after a full hash against the recorded digest."""
    if info.random_weights:
        return info
    here = Path(info.model_dir) if info.model_dir else None
    if here is not None and here.is_dir() and _fingerprint(_weight_files(here)) == info.weights_fingerprint:
        return info
    local = resolve_model(cfg, PreprocessConfig())
    if local.weights_sha256 != info.weights_sha256:
        raise ModelLoadError(f"model weights on this node differ from the driver's "
                             f"({local.weights_sha256} != {info.weights_sha256})")  # fmt: skip
    return dataclasses.replace(info, model_dir=local.model_dir)
