"""Decoders: exact frames, timestamps, rotation, agreement between decord and PyAV, error types."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLES, SHARED_VIDEOS
from tests.videogen import decode_index, index_frame, make_bad_inputs, write_index_video
from videoindex.decode import (
    ERROR_TYPE_DOC,
    ERROR_TYPES,
    DecodeError,
    PyAVReader,
    classify_error,
    open_video,
)

DECODERS = ("decord", "pyav")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_index_video(root / "index60.mp4", frames=60, fps=30)
    write_index_video(root / "long600.mp4", frames=600, fps=25, size=(48, 32 + 16))
    write_index_video(root / "index_mpeg4.avi", frames=40, fps=24, codec="mpeg4")
    for rotation in (90, 180, 270):
        write_index_video(root / f"rot{rotation}.mp4", frames=5, size=(64, 48), rotation=rotation)
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("zoo")
    return root, make_bad_inputs(root)


def test_index_code_round_trip() -> None:
    for i in (0, 1, 77, 600, 16383):
        assert decode_index(index_frame(i)) == i
        assert decode_index(index_frame(i, (200, 90))) == i
    with pytest.raises(ValueError, match="orientation"):
        decode_index(np.rot90(index_frame(3), 2))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["index60.mp4", "index_mpeg4.avi"])
def test_exact_frames_in_requested_order(videos: Path, decoder: str, name: str) -> None:
    indices = [5, 3, 3, 59 if name.endswith("mp4") else 39, 0, 17, 5]
    with open_video(str(videos / name), decoder=decoder, fallback_to_pyav=False) as reader:
        meta = reader.meta
        frames, times = reader.read(indices)
    assert meta.decoder == decoder and (meta.width, meta.height) == (64, 48)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), 48, 64, 3)
    assert times.dtype == np.float64
    assert [decode_index(f) for f in frames] == indices
    np.testing.assert_allclose(times, np.array(indices) / meta.fps, atol=2e-3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_far_indices_in_long_video(videos: Path, decoder: str) -> None:
    indices = [599, 580, 300, 301, 300, 555, 252]
    with open_video(str(videos / "long600.mp4"), decoder=decoder) as reader:
        assert reader.meta.frames == 600 and reader.meta.fps == 25.0
        frames, times = reader.read(indices)
    assert [decode_index(f) for f in frames] == indices
    np.testing.assert_allclose(times, np.array(indices) / 25.0, atol=1e-3)


def test_pyav_seeks_with_packet_index(videos: Path) -> None:
    with open_video(str(videos / "long600.mp4"), decoder="pyav") as reader:
        assert isinstance(reader, PyAVReader)
        got = reader._decode([555, 580], seek=True)  # {} would mean it fell back to decoding from 0
    assert {555, 580} <= set(got)
    assert decode_index(got[580][0]) == 580


@pytest.mark.parametrize("decoder", DECODERS)
def test_reads_past_the_end_are_clamped(videos: Path, decoder: str) -> None:
    with open_video(str(videos / "index60.mp4"), decoder=decoder) as reader:
        frames, _ = reader.read([58, 59, 75])
        assert reader.clamped
    assert [decode_index(f) for f in frames] == [58, 59, 59]


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_applied_by_both_decoders(videos: Path, rotation: int) -> None:
    results = {}
    for decoder in DECODERS:
        with open_video(str(videos / f"rot{rotation}.mp4"), decoder=decoder) as reader:
            assert reader.meta.rotation == (-rotation) % 360  # clockwise, like the legacy rotate tag
            assert (reader.meta.width, reader.meta.height) == (64, 48)
            results[decoder] = reader.read([0, 4])[0]
        assert [decode_index(f) for f in results[decoder]] == [0, 4]
    assert np.abs(results["decord"].astype(int) - results["pyav"]).mean() < 1.0


def test_video_90_mov_upright_and_equal() -> None:
    frames = {}
    for decoder in DECODERS:
        with open_video(str(SHARED_VIDEOS / "video_90.mov"), decoder=decoder) as reader:
            assert reader.meta.rotation == 90
            assert (reader.meta.width, reader.meta.height, reader.meta.frames) == (320, 568, 3)
            frames[decoder] = reader.read([0, 1, 2])[0]
    assert frames["decord"].shape == (3, 568, 320, 3)
    assert np.abs(frames["decord"].astype(int) - frames["pyav"]).mean() < 1.0


@pytest.mark.parametrize(
    "name", ["flipping_a_pancake.mkv", "demo.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]
)
def test_sample_videos_agree_across_decoders(name: str) -> None:
    metas, frames, times = {}, {}, {}
    for decoder in DECODERS:
        with open_video(str(SAMPLES / name), decoder=decoder) as reader:
            metas[decoder] = reader.meta
            last = reader.meta.frames - 1
            indices = [0, 7, last // 2, last - 3, last]
            frames[decoder], times[decoder] = reader.read(indices)
    d, p = metas["decord"], metas["pyav"]
    assert (d.frames, d.width, d.height, d.codec) == (p.frames, p.width, p.height, p.codec)
    assert d.fps == pytest.approx(p.fps, rel=1e-6)
    assert d.duration_s == pytest.approx(p.duration_s, abs=0.1)
    np.testing.assert_allclose(times["decord"], times["pyav"], atol=1e-3)
    assert np.abs(frames["decord"].astype(int) - frames["pyav"]).mean() < 2.0


def test_sample_frame_counts() -> None:
    expected = {
        "flipping_a_pancake.mkv": (310, 30.0),
        "demo.mp4": (280, 28.0),
        "bigbuckbunny.mp4": (132, 25.0),
    }
    for name, (count, fps) in expected.items():
        with open_video(str(SAMPLES / name), decoder="pyav") as reader:
            assert (reader.meta.frames, reader.meta.fps) == (count, fps)


def test_pyav_seek_agrees_with_decord_on_real_video() -> None:
    indices = [270, 251, 279]  # past the seek threshold: PyAV seeks to the keyframe before 251
    out = {}
    for decoder in DECODERS:
        with open_video(str(SAMPLES / "demo.mp4"), decoder=decoder) as reader:
            out[decoder] = reader.read(indices)
    assert np.abs(out["decord"][0].astype(int) - out["pyav"][0]).mean() < 2.0
    np.testing.assert_allclose(out["decord"][1], np.array(indices) / 28.0, atol=1e-3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_inputs(zoo: tuple[Path, dict[str, str]], decoder: str) -> None:
    root, expected = zoo
    for name, outcome in sorted(expected.items()):
        if outcome.startswith("ok:"):
            with open_video(str(root / name), decoder=decoder) as reader:
                frames, _ = reader.read(list(range(reader.meta.frames)))
                assert len({decode_index(f) for f in frames}) == int(outcome[3:]), name
                assert reader.meta.decoder in DECODERS
        else:
            with pytest.raises(DecodeError) as info:
                open_video(str(root / name), decoder=decoder)
            assert info.value.error_type == outcome, (name, str(info.value))
            assert info.value.stage in ("open", "probe") and str(info.value)


@pytest.mark.parametrize(
    ("name", "error_type"), [("av1.mp4", "unsupported_codec"), ("still_image.mp4", "not_a_video")]
)
def test_decord_falls_back_to_pyav_on_open(
    zoo: tuple[Path, dict[str, str]], name: str, error_type: str
) -> None:
    root, _ = zoo
    with open_video(str(root / name), decoder="decord") as reader:
        assert reader.meta.decoder == "pyav"
        assert reader.fallback is not None and reader.fallback.error_type == error_type
        assert reader.fallback.decoder == "decord" and "decord" in str(reader.fallback)
    with pytest.raises(DecodeError) as info:
        open_video(str(root / name), decoder="decord", fallback_to_pyav=False)
    assert info.value.error_type == error_type


def test_decord_falls_back_to_pyav_on_read(zoo: tuple[Path, dict[str, str]]) -> None:
    root, _ = zoo
    with open_video(str(root / "tiny_16x16.mp4"), decoder="decord") as reader:
        assert reader.meta.decoder == "decord" and reader.fallback is None
        frames, _ = reader.read([3, 1])
        assert reader.meta.decoder == "pyav" and reader.fallback is not None
        assert reader.fallback.stage == "decode"
    assert [decode_index(f) for f in frames] == [3, 1]


def test_vfr_indices_are_presentation_order(zoo: tuple[Path, dict[str, str]]) -> None:
    root, _ = zoo
    times = {}
    for decoder in DECODERS:
        with open_video(str(root / "vfr.mp4"), decoder=decoder) as reader:
            frames, times[decoder] = reader.read([19, 0, 4])
        assert [decode_index(f) for f in frames] == [19, 0, 4]
    np.testing.assert_allclose(times["decord"], times["pyav"], atol=1e-3)
    assert times["pyav"][1:].tolist() == pytest.approx([0.0, 0.18])


def test_missing_file_and_fsspec_url(tmp_path: Path) -> None:
    for decoder in DECODERS:
        with pytest.raises(DecodeError) as info:
            open_video(str(tmp_path / "nope.mp4"), decoder=decoder)
        assert info.value.error_type == "not_found" and "nope.mp4" in str(info.value)
    path = write_index_video(tmp_path / "a.mp4", frames=3)
    with open_video(f"file://{path}", decoder="decord") as reader:
        assert [decode_index(f) for f in reader.read([2])[0]] == [2]


@pytest.mark.parametrize("decoder", DECODERS)
def test_remote_filesystem_uses_file_objects(tmp_path: Path, decoder: str) -> None:
    import fsspec

    path = write_index_video(tmp_path / "m.mp4", frames=20)
    fs = fsspec.filesystem("memory")
    fs.pipe("/videos/m.mp4", path.read_bytes())
    with open_video("memory://videos/m.mp4", decoder=decoder, fs=fs) as reader:
        frames, _ = reader.read([19, 2])
    assert [decode_index(f) for f in frames] == [19, 2]


def test_classify_error_types() -> None:
    assert len(ERROR_TYPES) == 11 and set(ERROR_TYPES) == set(ERROR_TYPE_DOC)
    cases = [
        (FileNotFoundError("x"), None, "not_found"),
        (PermissionError("x"), None, "permission"),
        (OSError("whatever"), 0, "empty_file"),
        (MemoryError(), None, "out_of_memory"),
        (TimeoutError("slow"), None, "timeout"),
        (RuntimeError("Invalid data found when processing input"), None, "not_a_video"),
        (RuntimeError("Decoder not found"), None, "unsupported_codec"),
        (ConnectionError("reset by peer"), None, "storage"),
        (KeyError("bug"), None, "decoder_crash"),
    ]
    for exc, size, error_type in cases:
        error = classify_error(exc, size_bytes=size, stage="open", decoder="pyav", uri="s3://b/v.mp4")
        assert error.error_type == error_type, exc
        assert "s3://b/v.mp4" in str(error) and "pyav" in str(error)
    mid = classify_error(RuntimeError("error while decoding MB 3 4"), stage="decode", decoder="decord")
    assert (mid.error_type, mid.stage) == ("corrupt", "decode")
    copy = pickle.loads(pickle.dumps(mid))
    assert (copy.error_type, copy.stage, copy.decoder, str(copy)) == ("corrupt", "decode", "decord", str(mid))
