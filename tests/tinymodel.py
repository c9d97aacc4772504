"""A tiny random VideoMAE video classifier on disk, shaped like a real checkpoint directory.

Widths are tiny (fast on CPU), but image size, patch, frames and tubelet are the real ones, so the real
preprocessing and token count (8 x 14 x 14) run in every test that uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tiny_config(*, num_labels: int = 7, use_mean_pooling: bool = True) -> VideoMAEConfig:
    id2label = {i: f"label_{i}" for i in range(num_labels)}
    return VideoMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        num_frames=16,
        tubelet_size=2,
        use_mean_pooling=use_mean_pooling,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        architectures=["VideoMAEForVideoClassification"],
    )


def _legacy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Key names of transformers < 5 checkpoints: the q/v biases were ``q_bias`` / ``v_bias``."""
    renamed = {}
    for key, value in model.state_dict().items():
        key = key.replace("attention.attention.query.bias", "attention.attention.q_bias")
        key = key.replace("attention.attention.value.bias", "attention.attention.v_bias")
        renamed[key] = value.clone()
    return renamed


def make_tiny_videomae(
    dir: Path, *, num_labels: int = 7, use_mean_pooling: bool = True, legacy_bin: bool = False, seed: int = 0
) -> Path:
    """Save a tiny random checkpoint (+ preprocessor_config.json) into ``dir``; returns ``dir``.

    q/v biases are set to random non-zero values (the default init is zero), so a loader that drops
    them is caught.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(num_labels=num_labels, use_mean_pooling=use_mean_pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoMAEForVideoClassification(config).eval()
        with torch.no_grad():
            for layer in model.videomae.encoder.layer:
                layer.attention.attention.query.bias.normal_(0, 0.5)
                layer.attention.attention.value.bias.normal_(0, 0.5)
    if legacy_bin:
        config.save_pretrained(dir)
        torch.save(_legacy_state_dict(model), dir / "pytorch_model.bin")
    else:
        model.save_pretrained(dir)
    preprocessor = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_processor_type": "VideoMAEImageProcessor",
        "image_std": IMAGENET_STD,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 224},
    }
    (dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return dir
