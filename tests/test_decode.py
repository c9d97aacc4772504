"""Decoders: exact frames, timestamps, rotation, skipping, agreement between PyAV and decord, error types."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLES
from tests.videogen import decode_index, index_frame, make_bad_inputs, write_index_video
from videoindex.format.errortypes import ERROR_TYPE_DOC, ERROR_TYPES
from videoindex.stages.errors import DecodeError, classify_error
from videoindex.stages.pyav_reader import PyAVReader
from videoindex.stages.video import open_video, read_frames

DECODERS = ("pyav", "decord")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_index_video(root / "index60.mp4", frames=60, fps=30)
    write_index_video(root / "long600.mp4", frames=600, fps=25, size=(48, 32 + 16))
    write_index_video(root / "index_mpeg4.avi", frames=40, fps=24, codec="mpeg4")
    # x264's defaults: B frames, some of them references (b-pyramid); GOPs of 30
    write_index_video(root / "bframes.mp4", frames=240, fps=30, gop=30, preset="medium")
    write_index_video(root / "open_gop.mp4", frames=240, fps=30, gop=30, preset="medium",
                      x264_params="open-gop=1:keyint=30:min-keyint=30:scenecut=0")  # fmt: skip
    write_index_video(root / "raw.h264", frames=50, fps=30, gop=30, preset="medium", container_format="h264")
    for rotation in (90, 180, 270):
        write_index_video(root / f"rot{rotation}.mp4", frames=5, size=(64, 48), rotation=rotation)
    # QuickTime with a display matrix, portrait phone video shape
    write_index_video(root / "portrait.mov", frames=3, size=(320, 568), rotation=90, container_format="mov")
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
@pytest.mark.parametrize("name", ["index60.mp4", "index_mpeg4.avi", "bframes.mp4"])
def test_exact_frames_in_requested_order(videos: Path, decoder: str, name: str) -> None:
    last = {"index60.mp4": 59, "index_mpeg4.avi": 39, "bframes.mp4": 239}[name]
    indices = [5, 3, 3, last, 0, 17, 5]
    with open_video(str(videos / name), decoder=decoder, fallback_to_pyav=False) as reader:
        meta = reader.meta
        frames, times = read_frames(reader, indices)
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
        frames, times = read_frames(reader, indices)
    assert [decode_index(f) for f in frames] == indices
    np.testing.assert_allclose(times, np.array(indices) / 25.0, atol=1e-3)


def test_pyav_decodes_only_the_gops_it_needs(videos: Path) -> None:
    """Sparse frames of a 600-frame video (GOPs of 10): whole GOPs without a wanted frame are skipped."""
    wanted = [252, 300, 301, 555, 580, 599]
    with open_video(str(videos / "long600.mp4"), decoder="pyav") as reader:
        got = [(i, decode_index(f)) for i, f, _ in reader.frames(wanted, None)]
        decoded = reader.frames_decoded
    assert got == [(i, i) for i in wanted]
    assert decoded <= 6 * 10, decoded  # at most the six GOPs holding a wanted frame, not 600 frames


@pytest.mark.parametrize("name", ["bframes.mp4", "open_gop.mp4"])
def test_pyav_skips_unreferenced_frames_between_sampled_ones(videos: Path, name: str) -> None:
    """Every 4th frame (sliding sampling): non-reference B frames that no clip needs are not decoded, and
    every kept frame is exactly the one asked for, across GOP boundaries (open GOPs: frames shown before
    their keyframe)."""
    wanted = list(range(0, 240, 4))
    with open_video(str(videos / name), decoder="pyav") as reader:
        got = [(i, decode_index(f)) for i, f, _ in reader.frames(wanted, None)]
        decoded = reader.frames_decoded
    assert got == [(i, i) for i in wanted]
    assert len(wanted) <= decoded < 200, decoded  # some of the 180 unneeded frames were never decoded


def test_pyav_sparse_frames_after_a_skipped_open_gop(videos: Path) -> None:
    """Frames shown just before a keyframe of an open GOP need the GOP before it as references."""
    wanted = [58, 59, 60, 148, 149, 150]
    with open_video(str(videos / "open_gop.mp4"), decoder="pyav") as reader:
        assert [(i, decode_index(f)) for i, f, _ in reader.frames(wanted, None)] == [(i, i) for i in wanted]


def test_pyav_without_timestamps_decodes_every_frame(videos: Path) -> None:
    """A raw H.264 stream has no pts: the forward pass falls back to numbering frames as they come out."""
    with open_video(str(videos / "raw.h264"), decoder="pyav") as reader:
        frames, _ = read_frames(reader, [49, 3, 20])
        assert reader.meta.frames == 50
    assert [decode_index(f) for f in frames] == [49, 3, 20]


@pytest.mark.parametrize("decoder", DECODERS)
def test_resized_frames_keep_their_index(videos: Path, decoder: str) -> None:
    with open_video(str(videos / "bframes.mp4"), decoder=decoder) as reader:
        frames, _ = read_frames(reader, [7, 100], size=(96, 128))
    assert frames.shape == (2, 96, 128, 3)
    assert [decode_index(f) for f in frames] == [7, 100]


@pytest.mark.parametrize("decoder", DECODERS)
def test_reads_past_the_end_repeat_the_last_frame(videos: Path, decoder: str) -> None:
    with open_video(str(videos / "index60.mp4"), decoder=decoder) as reader:
        got = [(i, decode_index(f)) for i, f, _ in reader.frames([58, 59, 75], None)]
    assert got[:2] == [(58, 58), (59, 59)] and got[-1] == (59, 59)  # the last frame, once more
    with open_video(str(videos / "index60.mp4"), decoder=decoder) as reader:
        frames, _ = read_frames(reader, [58, 59, 75])
    assert [decode_index(f) for f in frames] == [58, 59, 59]


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_applied_by_both_decoders(videos: Path, rotation: int) -> None:
    results = {}
    for decoder in DECODERS:
        with open_video(str(videos / f"rot{rotation}.mp4"), decoder=decoder) as reader:
            assert reader.meta.rotation == (-rotation) % 360  # clockwise, like the legacy rotate tag
            assert (reader.meta.width, reader.meta.height) == (64, 48)
            results[decoder] = read_frames(reader, [0, 4])[0]
            resized = read_frames(reader, [4], size=(24, 32))[0]
        assert [decode_index(f) for f in results[decoder]] == [0, 4]
        assert resized.shape == (1, 24, 32, 3) and decode_index(resized[0]) == 4
    assert np.abs(results["decord"].astype(int) - results["pyav"]).mean() < 1.0


def test_quicktime_portrait_video_upright_and_equal(videos: Path) -> None:
    frames = {}
    for decoder in DECODERS:
        with open_video(str(videos / "portrait.mov"), decoder=decoder) as reader:
            assert reader.meta.rotation == 270
            assert (reader.meta.width, reader.meta.height, reader.meta.frames) == (320, 568, 3)
            frames[decoder] = read_frames(reader, [0, 1, 2])[0]
    assert frames["decord"].shape == (3, 568, 320, 3)
    assert [decode_index(f) for f in frames["pyav"]] == [0, 1, 2]
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
            frames[decoder], times[decoder] = read_frames(reader, indices)
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


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_inputs(zoo: tuple[Path, dict[str, str]], decoder: str) -> None:
    root, expected = zoo
    for name, outcome in sorted(expected.items()):
        if outcome.startswith("ok:"):
            with open_video(str(root / name), decoder=decoder) as reader:
                frames, _ = read_frames(reader, list(range(reader.meta.frames)))
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
        frames, _ = read_frames(reader, [3, 1])
        assert reader.meta.decoder == "pyav" and reader.fallback is not None
        assert reader.fallback.stage == "decode"
    assert [decode_index(f) for f in frames] == [3, 1]


def test_vfr_indices_are_presentation_order(zoo: tuple[Path, dict[str, str]]) -> None:
    root, _ = zoo
    times = {}
    for decoder in DECODERS:
        with open_video(str(root / "vfr.mp4"), decoder=decoder) as reader:
            frames, times[decoder] = read_frames(reader, [19, 0, 4])
        assert [decode_index(f) for f in frames] == [19, 0, 4]
    np.testing.assert_allclose(times["decord"], times["pyav"], atol=1e-3)
    assert times["pyav"][1:].tolist() == pytest.approx([0.0, 0.18])


def test_missing_file_and_fsspec_url(tmp_path: Path) -> None:
    for decoder in DECODERS:
        with pytest.raises(DecodeError) as info:
            open_video(str(tmp_path / "nope.mp4"), decoder=decoder)
        assert info.value.error_type == "not_found" and "nope.mp4" in str(info.value)
    path = write_index_video(tmp_path / "a.mp4", frames=3)
    for decoder in DECODERS:
        with open_video(f"file://{path}", decoder=decoder) as reader:
            assert [decode_index(f) for f in read_frames(reader, [2])[0]] == [2]


@pytest.mark.parametrize("decoder", DECODERS)
def test_remote_filesystem_uses_file_objects(tmp_path: Path, decoder: str) -> None:
    import fsspec

    path = write_index_video(tmp_path / "m.mp4", frames=20)
    fs = fsspec.filesystem("memory")
    fs.pipe("/videos/m.mp4", path.read_bytes())
    with open_video("memory://videos/m.mp4", decoder=decoder, fs=fs) as reader:
        frames, _ = read_frames(reader, [19, 2])
        assert reader.size_bytes == path.stat().st_size
    assert [decode_index(f) for f in frames] == [19, 2]


def test_classify_error_types() -> None:
    assert len(ERROR_TYPES) == 11 and set(ERROR_TYPES) == set(ERROR_TYPE_DOC)
    cases = [
        (FileNotFoundError("x"), None, "not_found"),
        (PermissionError("x"), None, "permission"),
        (OSError("whatever"), 0, "empty_file"),
        (MemoryError(), None, "out_of_memory"),
        (TimeoutError("read timed out"), None, "storage"),  # a read that timed out; decode timeouts come
        # from the executors, which kill the worker (tests/test_local_executor.py, tests/test_faults.py)
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


def test_pyav_reader_is_the_default_opener(videos: Path) -> None:
    with open_video(str(videos / "index60.mp4"), decoder="pyav") as reader:
        assert isinstance(reader, PyAVReader)


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "demo.mp4"])
def test_scaling_modes_against_the_reference_resize(name: str) -> None:
    """decode.scale rgb is the reference resize of full-resolution RGB frames, bit for bit (so PyAV and
    decord give the same pixels); swscale scales in YUV, about a grey level off on camera video."""
    from videoindex.stages.preprocess import resize_frames, resized_shape

    with open_video(str(SAMPLES / name), decoder="pyav") as reader:
        full, _ = read_frames(reader, [0, 40, 80])
        size = resized_shape(reader.meta.height, reader.meta.width, 224)
        exact, _ = read_frames(reader, [0, 40, 80], size=size)
    with open_video(str(SAMPLES / name), decoder="pyav", scale="swscale") as reader:
        fast, _ = read_frames(reader, [0, 40, 80], size=size)
    with open_video(str(SAMPLES / name), decoder="decord") as reader:
        decord, _ = read_frames(reader, [0, 40, 80], size=size)
    reference = resize_frames(full, size)
    assert np.array_equal(exact, reference) and np.array_equal(decord, reference)
    difference = np.abs(fast.astype(int) - reference)
    assert 0 < difference.mean() < 3.0, difference.mean()


def test_swscale_needs_pyav() -> None:
    from videoindex.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="decode.scale swscale needs decode.decoder pyav"):
        load_config(None, {"input.uri": "/in", "output.uri": "/out", "decode.decoder": "decord",
                           "decode.scale": "swscale"})  # fmt: skip


def test_a_damaged_stream_is_indexed_up_to_its_last_good_frame_and_says_so(tmp_path: Path) -> None:
    """Everything after the first GOP overwritten with zeros: the decoder rejects those packets; the video
    is still indexed (later sampled frames repeat the last good one) and a recovered ``corrupt`` error
    says how many packets were lost."""
    import av

    from videoindex.config import DecodeConfig, SamplingConfig
    from videoindex.format.plans import VideoTask
    from videoindex.stages.decode import ClipBatch, DecodeSettings, VideoEnd, decode_video
    from videoindex.stages.preprocess import PreprocessSpec

    path = write_index_video(tmp_path / "damaged.mp4", frames=300, gop=30, preset="medium")
    with av.open(str(path)) as container:
        second_key = [p.pos for p in container.demux(container.streams.video[0]) if p.size and p.is_keyframe][
            1
        ]
    data = bytearray(path.read_bytes())
    index = data.find(b"moov")
    data[second_key : index - 8] = bytes(index - 8 - second_key)
    path.write_bytes(bytes(data))
    settings = DecodeSettings(
        SamplingConfig(), DecodeConfig(), PreprocessSpec(resize_short_side=48, crop_size=48)
    )
    events = list(decode_video(VideoTask(str(path), "d", None, None, None, 0), settings))
    end = events[-1]
    assert isinstance(end, VideoEnd) and len(end.recovered) == 1
    error = end.recovered[0]
    assert (error.error_type, error.stage) == ("corrupt", "decode") and "could not be decoded" in str(error)
    first_clip = [decode_index(f) for f in next(e for e in events if isinstance(e, ClipBatch)).frames[0]]
    assert first_clip[:8] == list(range(0, 32, 4))  # the first GOP (frames 0-29) decodes
    assert len(set(first_clip[8:])) == 1 and 28 <= first_clip[8] <= 29  # then its last frame, repeated
