"""Preprocessing matches transformers' own VideoMAE image processor on real sample videos."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

from videoindex.config import PreprocessConfig
from videoindex.stages.preprocess import (
    DEFAULTS_SOURCE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    crop_offsets,
    load_preprocess_spec,
    normalize,
    resize_and_crop,
)

SAMPLES = Path(__file__).resolve().parents[1] / "videoindex" / "samples"
ASSETS = Path(__file__).resolve().parents[1] / "videoindex" / "assets" / "videomae-small-finetuned-ssv2"
VIDEOS = ["carphone_pristine.mp4", "bigbuckbunny.mp4", "demo.mp4", "flipping_a_pancake.mkv"]
SPEC = PreprocessSpec()


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    """16 frames (stride 4) of every sample video, decoded once."""
    out = {}
    for name in VIDEOS:
        reader = decord.VideoReader(str(SAMPLES / name))
        out[name] = reader.get_batch(list(range(0, 64, 4))).asnumpy()
        del reader
    return out


def hf_processor(**kwargs) -> VideoMAEImageProcessorPil:
    # The processor's own defaults are mean/std 0.5; the checkpoint's values are passed like from_pretrained would.
    return VideoMAEImageProcessorPil(image_mean=list(SPEC.mean), image_std=list(SPEC.std), **kwargs)


def hf_uint8(frames: np.ndarray, **kwargs) -> np.ndarray:
    """uint8[T,H,W,3] resized (and centre-cropped unless told otherwise) by transformers, before rescaling."""
    out = hf_processor(**kwargs)(list(frames), do_rescale=False, do_normalize=False, return_tensors="np")
    return out["pixel_values"][0].transpose(0, 2, 3, 1)


def assert_close_uint8(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"max diff {diff.max()} grey levels"
    assert (diff > 0).mean() < 0.02, f"{(diff > 0).mean():.2%} of values differ"


@pytest.mark.parametrize("name", VIDEOS)
def test_centre_crop_matches_hf_processor(frames: dict[str, np.ndarray], name: str) -> None:
    ours = resize_and_crop(frames[name], SPEC)
    assert ours.shape == (16, 224, 224, 3)
    assert_close_uint8(ours, hf_uint8(frames[name]))


@pytest.mark.parametrize("name", ["carphone_pristine.mp4", "bigbuckbunny.mp4"])
def test_pixel_values_match_hf_processor(frames: dict[str, np.ndarray], name: str) -> None:
    ref = hf_processor()(list(frames[name]), return_tensors="pt")["pixel_values"]
    ours = normalize(torch.from_numpy(resize_and_crop(frames[name], SPEC))[None], SPEC, torch.float32, "cpu")
    assert ours.shape == ref.shape == (1, 16, 3, 224, 224)
    one_grey_level = 1 / 255 / min(SPEC.std)
    assert (ours - ref).abs().max().item() <= one_grey_level + 1e-5


@pytest.mark.parametrize("shape", [(2, 101, 157, 3), (2, 225, 225, 3), (2, 224, 301, 3), (2, 333, 250, 3)])
def test_odd_and_small_sizes_match_hf_processor(shape: tuple[int, ...]) -> None:
    """Upscaling, odd sizes, no-resize (short side already 224) and portrait frames."""
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, shape[1] * shape[2] * 3).reshape(shape[1:]).astype(np.uint8)
    frames = np.stack([smooth, rng.integers(0, 256, shape[1:], dtype=np.uint8)])
    assert_close_uint8(resize_and_crop(frames, SPEC), hf_uint8(frames))


def test_crop_offsets_follow_hf_centre_crop() -> None:
    assert crop_offsets(224, 398, 224, 0) == (0, 87)  # (398 - 224) // 2
    assert crop_offsets(225, 301, 224, 0) == (0, 38)
    assert crop_offsets(224, 398, 224, 1) == (0, 0)
    assert crop_offsets(224, 398, 224, 2) == (0, 174)
    assert crop_offsets(300, 224, 224, 1) == (0, 0)  # portrait: along the height
    assert crop_offsets(300, 224, 224, 2) == (76, 0)
    assert crop_offsets(256, 300, 224, 1) == (16, 0)  # short side stays centred
    with pytest.raises(ValueError, match="crop_position"):
        crop_offsets(224, 224, 224, 3)


@pytest.mark.parametrize("portrait", [False, True])
def test_three_crops_are_the_start_centre_end_windows(frames: dict[str, np.ndarray], portrait: bool) -> None:
    clip = frames["bigbuckbunny.mp4"][:4]
    if portrait:
        clip = np.ascontiguousarray(clip.transpose(0, 2, 1, 3))
    full = hf_uint8(clip, do_center_crop=False)  # 224 x 398 (or 398 x 224): the whole resized frame
    long_side = max(full.shape[1:3])
    assert long_side == 398
    crops = {pos: resize_and_crop(clip, SPEC, crop_position=pos) for pos in (0, 1, 2)}
    for pos, offset in ((1, 0), (0, (long_side - 224) // 2), (2, long_side - 224)):
        window = full[:, offset : offset + 224] if portrait else full[:, :, offset : offset + 224]
        assert_close_uint8(crops[pos], window)
    assert not np.array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[0], crops[2])
    assert not np.array_equal(crops[1], crops[2])


def test_rejects_non_uint8_frames() -> None:
    with pytest.raises(ValueError, match=r"uint8\[T,H,W,3\]"):
        resize_and_crop(np.zeros((2, 100, 100, 3), np.float32), SPEC)


def test_normalize_layout_dtype_and_values() -> None:
    rng = np.random.default_rng(1)
    clips = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    spec = PreprocessSpec(resize_short_side=8, crop_size=8)
    out = normalize(torch.from_numpy(clips), spec, torch.bfloat16, "cpu")
    assert out.shape == (2, 3, 3, 8, 8) and out.dtype == torch.bfloat16 and out.is_contiguous()
    expected = (clips / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    expected = torch.from_numpy(expected.transpose(0, 1, 4, 2, 3)).float()
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)  # bf16 precision
    torch.testing.assert_close(normalize(clips, spec, torch.float32, "cpu"), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 2, 8, 8, 3), spec, torch.float32, "cpu")


def test_spec_from_checkpoint_config() -> None:
    spec = load_preprocess_spec(ASSETS, PreprocessConfig())
    assert spec == PreprocessSpec(source=str(ASSETS / "preprocessor_config.json"))


def test_spec_defaults_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="videoindex.preprocess"):
        spec = load_preprocess_spec(tmp_path, PreprocessConfig())
    assert spec.source == DEFAULTS_SOURCE and spec.mean == IMAGENET_MEAN and spec.crop_size == 224
    assert "ImageNet" in caplog.text and "preprocessor_config.json" in caplog.text
    assert load_preprocess_spec(None, PreprocessConfig()).source == DEFAULTS_SOURCE


def test_spec_reads_other_keys_and_overrides_win(tmp_path: Path) -> None:
    config = {
        "size": {"height": 256, "width": 320},
        "crop_size": 192,
        "image_mean": [0.5] * 3,
        "image_std": 0.25,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    spec = load_preprocess_spec(tmp_path, PreprocessConfig())
    assert (spec.resize_short_side, spec.crop_size, spec.mean, spec.std) == (
        256,
        192,
        (0.5,) * 3,
        (0.25,) * 3,
    )
    spec = load_preprocess_spec(tmp_path, PreprocessConfig(resize_short_side=288, std=(0.2, 0.2, 0.2)))
    assert (spec.resize_short_side, spec.crop_size, spec.std) == (288, 192, (0.2, 0.2, 0.2))
    assert "overrides" in spec.source
    with pytest.raises(ValueError, match="crop_size 300"):
        load_preprocess_spec(tmp_path, PreprocessConfig(crop_size=300))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": 128, "crop_size": {"height": 112, "width": 112}})
    )
    assert load_preprocess_spec(tmp_path, PreprocessConfig()).crop_size == 112  # smaller than the defaults
