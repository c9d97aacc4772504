"""Model stage: loading (safetensors, legacy .bin, random weights, hub offline), forward equivalence with
transformers, and end-to-end equivalence with the plain transformers path on real videos."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import decord
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

from tests.tinymodel import make_tiny_videomae
from videoindex.config import DEFAULT_MODEL, ConfigError, ModelConfig, PreprocessConfig
from videoindex.stages.checkpoint import ModelLoadError, resolve_model
from videoindex.stages.model import ModelThread, VideoClassifier
from videoindex.stages.preprocess import normalize, resize_and_crop

SAMPLES = Path(__file__).resolve().parents[1] / "videoindex" / "samples"
VIDEOS = ["carphone_pristine.mp4", "bigbuckbunny.mp4", "demo.mp4", "flipping_a_pancake.mkv"]
PRE = PreprocessConfig()


def load(model_dir: Path, **kwargs) -> VideoClassifier:
    cfg = ModelConfig(name=str(model_dir), **kwargs)
    return VideoClassifier(resolve_model(cfg, PRE), cfg)


def random_clips(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 16, 224, 224, 3), dtype=np.uint8)


@pytest.fixture()
def offline_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub and an empty HF cache, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_local_safetensors_dir(tiny_model_dir: Path) -> None:
    clf = load(tiny_model_dir, top_k=10)
    info = clf.info
    assert info.id2label == {i: f"label_{i}" for i in range(7)}
    assert (info.num_labels, info.embed_dim, info.num_frames, info.pooling) == (7, 32, 16, "mean")
    assert (
        info.weights_sha256 == hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert info.tag == str(tiny_model_dir) and not info.random_weights
    assert json.loads(json.dumps(info.config))["hidden_size"] == 32  # JSON-able for _job.json
    out = clf(random_clips(3))
    assert out.logits.shape == out.probs.shape == (3, 7) and out.embeddings.shape == (3, 32)
    assert out.topk_ids.shape == out.topk_scores.shape == (3, 7)  # k = min(top_k, labels)
    assert out.logits.dtype == out.probs.dtype == out.embeddings.dtype == out.topk_scores.dtype == np.float32
    assert out.topk_ids.dtype == np.int32
    np.testing.assert_allclose(out.probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.topk_ids[:, 0], out.logits.argmax(1))
    assert np.all(np.diff(out.topk_scores, axis=1) <= 0)


def test_legacy_bin_keeps_q_and_v_biases(tmp_path: Path, tiny_model_dir: Path) -> None:
    """transformers < 5 checkpoints store attention biases as q_bias/v_bias; they must load, not default to 0."""
    legacy = make_tiny_videomae(tmp_path / "legacy", legacy_bin=True)
    saved = torch.load(legacy / "pytorch_model.bin", weights_only=True)
    assert any(k.endswith("attention.attention.q_bias") for k in saved)
    clf = load(legacy)
    layers = clf.model.videomae.encoder.layer
    for n, layer in enumerate(layers):
        attention = layer.attention.attention
        q_bias = saved[f"videomae.encoder.layer.{n}.attention.attention.q_bias"]
        v_bias = saved[f"videomae.encoder.layer.{n}.attention.attention.v_bias"]
        assert q_bias.abs().sum() > 0 and v_bias.abs().sum() > 0
        assert torch.equal(attention.query.bias, q_bias)
        assert torch.equal(attention.value.bias, v_bias)
    assert len(layers) == 2
    # Same seed, same weights: the legacy file and the safetensors file compute the same outputs.
    clips = random_clips(2)
    np.testing.assert_array_equal(clf(clips).logits, load(tiny_model_dir)(clips).logits)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_forward_equals_transformers_forward(tmp_path: Path, mean_pooling: bool) -> None:
    clf = load(make_tiny_videomae(tmp_path, use_mean_pooling=mean_pooling))
    assert clf.info.pooling == ("mean" if mean_pooling else "cls")
    assert (clf.model.fc_norm is not None) == mean_pooling
    pixel_values = torch.randn(2, 16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    logits, embeddings = clf.forward_pixels(pixel_values)
    with torch.inference_mode():
        reference = clf.model(pixel_values).logits
    assert torch.equal(logits, reference)
    assert embeddings.shape == (2, 32)
    out = clf(random_clips(2))  # the uint8 path agrees with the pixel path
    pixel_values = normalize(torch.from_numpy(random_clips(2)), clf.info.preprocess, torch.float32, "cpu")
    with torch.inference_mode():
        np.testing.assert_array_equal(out.logits, clf.model(pixel_values).logits.numpy())


def test_random_weights_are_identical_and_tagged(tiny_model_dir: Path) -> None:
    first, second = load(tiny_model_dir, random_weights=True), load(tiny_model_dir, random_weights=True)
    assert "RANDOM WEIGHTS" in first.info.tag and first.info.weights_sha256 is None
    clips = random_clips(2)
    a, b = first(clips), second(clips)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert not np.array_equal(a.logits, load(tiny_model_dir)(clips).logits)  # not the saved weights


def test_random_weights_default_model_offline_uses_packaged_config(offline_empty_cache: None) -> None:
    info = resolve_model(ModelConfig(random_weights=True), PRE)
    assert Path(info.model_dir).name == "videomae-small-finetuned-ssv2"  # videoindex/assets, not the hub
    assert (info.num_labels, info.embed_dim, info.config["num_attention_heads"]) == (174, 384, 16)
    assert info.id2label[0] == "Approaching something with your camera"
    assert info.tag == f"{DEFAULT_MODEL} [RANDOM WEIGHTS seed=0]"
    assert info.preprocess.mean == (0.485, 0.456, 0.406)
    overridden = resolve_model(
        ModelConfig(random_weights=True, config_overrides={"num_attention_heads": 6}), PRE
    )
    assert overridden.config["num_attention_heads"] == 6


def test_default_model_offline_fails_with_instructions(offline_empty_cache: None) -> None:
    with pytest.raises(ModelLoadError) as error:
        resolve_model(ModelConfig(), PRE)
    message = str(error.value)
    assert "--model" in message and "--random-weights" in message and "huggingface-cli download" in message


def test_other_hub_model_offline_random_weights_needs_a_config(offline_empty_cache: None) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(ModelConfig(name="someone/videomae-other", random_weights=True), PRE)


def test_missing_dir_and_missing_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(ModelConfig(name=str(tmp_path / "nowhere")), PRE)
    (tmp_path / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="--random-weights"):
        resolve_model(ModelConfig(name=str(tmp_path)), PRE)
    assert resolve_model(ModelConfig(name=str(tmp_path), random_weights=True), PRE).num_labels == 7


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "vit"}, "model_type is 'vit'"),
        ({"architectures": ["VideoMAEForPreTraining"]}, "not a video classification checkpoint"),
        ({"id2label": None, "label2id": None}, "not a video classification checkpoint"),
    ],
)
def test_refuses_non_classifiers(tmp_path: Path, tiny_model_dir: Path, change: dict, message: str) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(ModelConfig(name=str(tmp_path), random_weights=True), PRE)


def test_config_checks(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        resolve_model(ModelConfig(name=str(tiny_model_dir), config_overrides={"num_heads": 4}), PRE)
    with pytest.raises(ConfigError, match="image_size 224"):
        resolve_model(ModelConfig(name=str(tiny_model_dir)), PreprocessConfig(crop_size=192))
    with pytest.raises(ValueError, match=r"uint8\[B,16,224,224,3\]"):
        load(tiny_model_dir)(random_clips(1)[:, :8])


# -------------------------------------------------------------------- reference equivalence (full size)


@pytest.fixture(scope="module")
def sample_clips() -> dict[str, list[np.ndarray]]:
    """Two 16-frame clips (stride 4: start and end) per sample video, decoded once."""
    clips = {}
    for name in VIDEOS:
        reader = decord.VideoReader(str(SAMPLES / name))
        last = len(reader) - 64
        starts = [0, last]
        clips[name] = [reader.get_batch(list(range(s, s + 64, 4))).asnumpy() for s in starts]
        del reader
    return clips


def test_matches_plain_transformers_path(
    sample_clips: dict[str, list[np.ndarray]], offline_empty_cache: None
) -> None:
    """Our path (torch resize + crop, normalise on device, our pooling) against the transformers path (PIL
    processor with the checkpoint's mean/std, model(...).logits, fc_norm output) on the full-size default
    architecture with random weights."""
    cfg = ModelConfig(random_weights=True)
    clf = VideoClassifier(resolve_model(cfg, PRE), cfg)
    spec = clf.info.preprocess
    processor = VideoMAEImageProcessorPil(image_mean=list(spec.mean), image_std=list(spec.std))
    pooled: list[torch.Tensor] = []
    clf.model.fc_norm.register_forward_hook(lambda module, args, output: pooled.append(output))
    ours_emb, ref_emb, agree = [], [], []
    for clips in sample_clips.values():
        ours = clf(np.stack([resize_and_crop(clip, spec) for clip in clips]))
        pooled.clear()
        pixel_values = torch.cat(
            [processor(list(clip), return_tensors="pt")["pixel_values"] for clip in clips]
        )
        with torch.inference_mode():
            ref_logits = clf.model(pixel_values).logits
        ours_emb.append(torch.from_numpy(ours.embeddings))
        ref_emb.append(pooled[0])
        agree += (ours.topk_ids[:, 0] == ref_logits.argmax(1).numpy()).tolist()
    ours_emb, ref_emb = torch.cat(ours_emb), torch.cat(ref_emb)
    cosine = torch.nn.functional.cosine_similarity(ours_emb, ref_emb)
    between = torch.nn.functional.cosine_similarity(ref_emb[:, None], ref_emb[None], dim=-1)
    closest_other = between.fill_diagonal_(-1).max()
    print(
        f"\n{len(agree)} clips: min cosine {cosine.min():.7f} (1 - cos <= {1 - cosine.min():.1e}), top-1 "
        f"agreement {np.mean(agree):.0%}; most similar different clips: cosine {closest_other:.4f}"
    )
    assert cosine.min() >= 0.999
    assert np.mean(agree) >= 0.95
    assert 1 - closest_other > 100 * (1 - cosine.min())  # clips differ far more than the two paths do


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_path_on_each_device(tiny_model_dir: Path, device: str, dtype: str) -> None:
    """The path CUDA takes by default (half precision weights, uint8 moved first and normalised on the
    device, float32 outputs) runs here with the device as a parameter, against float32 on CPU."""
    reference = load(tiny_model_dir, device="cpu", dtype="float32")
    half = load(tiny_model_dir, device=device, dtype=dtype)
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    assert half.device.type == device
    clips = random_clips(3, seed=7)
    ref, out = reference(clips), half(clips)
    assert out.logits.dtype == out.embeddings.dtype == np.float32  # Parquet columns stay float32
    assert out.logits.shape == ref.logits.shape and out.embeddings.shape == ref.embeddings.shape
    cosine = (out.embeddings * ref.embeddings).sum(1) / (
        np.linalg.norm(out.embeddings, axis=1) * np.linalg.norm(ref.embeddings, axis=1)
    )
    assert cosine.min() > 0.99, cosine
    np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)
    assert not np.array_equal(out.logits, ref.logits)  # really ran in half precision


@pytest.mark.parametrize("device", DEVICES)
def test_auto_dtype_follows_the_device(tiny_model_dir: Path, device: str) -> None:
    clf = load(tiny_model_dir, device=device, dtype="auto")
    assert next(clf.model.parameters()).dtype == {"cpu": torch.float32, "cuda": torch.bfloat16}[device]


def _threads_while_callers_wait(run, callers: int) -> int:
    """OS threads of this process started since this call, while ``callers`` threads have each called
    ``run`` and are still alive (threads of earlier tests that end meanwhile do not count)."""
    before = set(os.listdir("/proc/self/task"))
    done, release = threading.Barrier(callers + 1), threading.Event()

    def call() -> None:
        run()
        done.wait()
        release.wait()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    done.wait()
    count = len(set(os.listdir("/proc/self/task")) - before)
    release.set()
    for thread in threads:
        thread.join()
    return count


@pytest.mark.skipif(sys.platform != "linux", reason="counts threads in /proc")
def test_model_thread_keeps_one_openmp_team(tiny_model_dir: Path) -> None:
    """Calls from many threads run on the model's one thread. libgomp gives every thread that runs a
    parallel op its own team, and with more team threads than cores it sleeps at every barrier; the
    control (the classifier called directly from each thread) shows the teams it would make."""
    threads_before = torch.get_num_threads()
    try:
        cfg = ModelConfig(name=str(tiny_model_dir))
        info = resolve_model(cfg, PRE)
        model = ModelThread(lambda: VideoClassifier(info, cfg), torch_threads=2)
        clips = random_clips(2)
        expected = model(clips).logits
        outputs = []
        with_model_thread = _threads_while_callers_wait(lambda: outputs.append(model(clips).logits), 3)
        assert with_model_thread == 3  # the three callers, no team of their own
        for logits in outputs:
            np.testing.assert_array_equal(logits, expected)

        direct = model.classifier
        assert _threads_while_callers_wait(lambda: direct(clips), 3) > 3  # control
        model.close()
    finally:
        torch.set_num_threads(threads_before)


def test_driver_side_config_keys_match_transformers() -> None:
    """The driver validates config_overrides without importing transformers: its list must be current."""
    from transformers import VideoMAEConfig

    from videoindex.stages.checkpoint import VIDEOMAE_CONFIG_KEYS, VIDEOMAE_DEFAULTS

    config = VideoMAEConfig()
    assert set(config.to_dict()) == VIDEOMAE_CONFIG_KEYS
    assert {key: getattr(config, key) for key in VIDEOMAE_DEFAULTS} == dict(VIDEOMAE_DEFAULTS)


def test_resolving_a_checkpoint_imports_no_torch(tiny_model_dir: Path) -> None:
    """The driver resolves the model (config, label map, weights digest) in a process without torch."""
    import subprocess
    import sys

    script = ("import sys; from videoindex.config import ModelConfig, PreprocessConfig\n"
              "from videoindex.stages.checkpoint import resolve_model\n"
              f"info = resolve_model(ModelConfig(name={str(tiny_model_dir)!r}), PreprocessConfig())\n"
              "print(info.num_labels, info.embed_dim, len(info.weights_sha256), 'torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", "32", "64", "False"]
