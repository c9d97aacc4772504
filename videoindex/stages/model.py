"""Model stage: a VideoMAE video classifier as a callable, loaded once per process.

``VideoClassifier`` builds the checkpoint a ``ModelInfo`` describes (``stages.checkpoint``) and turns
``uint8[B,T,S,S,3]`` crops into float32 logits, probabilities, top-k and pooled embeddings; the same
object runs in a plain loop in tests, in the local executor and inside a Ray actor.

Random weights (``--random-weights``) keep the architecture and the label map but initialise every
parameter from seed 0, so every actor and every run computes bit-identical (meaningless) outputs; the
``model`` column of every row says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from videoindex.config import ModelConfig
from videoindex.stages.checkpoint import RANDOM_SEED, ModelInfo, ModelLoadError
from videoindex.stages.preprocess import normalize

log = logging.getLogger(__name__)


@dataclass
class ClipOutputs:
    """One batch of B clips; float32 throughout, whatever dtype the model ran in."""

    logits: np.ndarray  # float32[B,L]
    embeddings: np.ndarray  # float32[B,D]: pooled features that feed the classifier
    probs: np.ndarray  # float32[B,L]: softmax of logits
    topk_ids: np.ndarray  # int32[B,k], best first
    topk_scores: np.ndarray  # float32[B,k]: probabilities of topk_ids


def cuda_available(cfg: ModelConfig) -> bool:
    """Whether the model will run on CUDA here (model.device auto: when a GPU is visible)."""
    if cfg.device == "cpu":
        return False
    return cfg.device.startswith("cuda") or torch.cuda.is_available()


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
