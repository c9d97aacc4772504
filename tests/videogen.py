"""Test videos written at test time with PyAV (no ffmpeg binary needed).

``write_index_video`` writes frames whose pixels encode their own index, so a test can check that a
decoder returned exactly the frames it asked for: ``decode_index(frame) == index``. The code survives
lossy compression and resizing: the upright frame is a 4x4 grid of black/white cells, the top-left
cell always white and the bottom-right always black (so a frame that is not upright fails to decode),
the other 14 cells are the bits of the index (0..16383).

``make_bad_inputs`` builds the zoo of awkward inputs for robustness tests; ``BAD_INPUT_FINDINGS``
records what each produced with both decoders here (decord 0.6 with its bundled FFmpeg 4.1, PyAV 18
with FFmpeg 8).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

GRID = 4  # cells per side
BITS = GRID * GRID - 2  # two cells are orientation markers
MAX_INDEX = 2**BITS - 1

# What each bad input gives, measured here: "ok:N" means it decodes to N frames with both decoders,
# otherwise the error_type that decode.classify_error gives. Notes say where decoders differ.
BAD_INPUT_FINDINGS: dict[str, str] = {
    "empty.mp4": "empty_file (both decoders fail on open; size 0 decides)",
    "truncated.mp4": "not_a_video (moov atom at the end is cut off: 'Invalid data found' in PyAV, "
    "decord 'Error reading ...')",
    "random_bytes.mp4": "not_a_video",
    "text.mp4": "not_a_video",
    "audio_only.mp4": "no_video_stream",
    "still_image.mp4": "ok:1 with PyAV (FFmpeg probes the PNG content whatever the name; fps 25 from "
    "the image2 demuxer); decord fails on open ('Failed to measure duration'), so PyAV fallback",
    "truncated_faststart.mp4": "ok:12 of 30 (index first, data cut at 75%: the container says 30 "
    "frames, 12 decode; reads past them return frame 11 and set reader.clamped. decord fails on open "
    "('av_read_frame failed'), so it is read with the PyAV fallback)",
    "one_frame.mp4": "ok:1",
    "twelve_frames.mp4": "ok:12",
    "odd_dims_63x47.avi": "ok:10 (mpeg4 in AVI accepts odd sizes with yuv420p)",
    "tiny_16x16.mp4": "ok:10 (decord opens it but get_batch fails for widths 16, 24, 48: 'size must "
    "exactly match'; the decord reader re-reads with PyAV and records the fallback)",
    "vfr.mp4": "ok:20 (both decoders index frames in presentation order; fps is the average)",
    "gray.mkv": "ok:10 (ffv1 gray; both decoders convert to RGB)",
    "ten_bit.mp4": "ok:10 (h264 High 10; decord's FFmpeg 4.1 decodes it)",
    "name with spaces é ü.mp4": "ok:10",
    "UPPER.MP4": "ok:10",
    "dir.mp4": "not_a_video (a directory: IsADirectoryError from both decoders)",
    "broken_link.mp4": "not_found",
    "rotated_90.mp4": "ok:10 (display matrix 90 degrees counter-clockwise, rotation 270 clockwise; both decoders return the upright 64x48 frames)",
    "uhd_4k.mp4": "ok:3 (3840x2160; 3 frames keep the encode near 1 s)",
    "no_permission.mp4": "permission (mode 000; only written when not running as root, who reads anyway)",
    "av1.mp4": "ok:10 with PyAV; decord has no AV1 decoder and fails on open with 'cannot find video "
    "stream' (the same message as audio only; PyAV's probe tells them apart: unsupported_codec)",
}


def index_frame(index: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """The upright picture of frame ``index``: uint8[H,W,3], gray levels 0 or 255 only."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index {index} outside 0..{MAX_INDEX}")
    width, height = size
    cells = np.zeros(GRID * GRID, np.uint8)
    cells[0] = 1
    for bit in range(BITS):
        cells[1 + bit] = (index >> bit) & 1
    grid = cells.reshape(GRID, GRID) * 255
    rows = np.minimum(np.arange(height) * GRID // height, GRID - 1)
    cols = np.minimum(np.arange(width) * GRID // width, GRID - 1)
    gray = grid[rows[:, None], cols[None, :]]
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_index(frame: np.ndarray) -> int:
    """Read back the index drawn by ``index_frame`` from uint8[H,W,3] (any size, lossy).

    Raises ValueError when the orientation markers are wrong (frame not upright or not an index frame).
    """
    gray = frame.astype(np.float32).mean(axis=2)
    height, width = gray.shape
    bits = []
    for r in range(GRID):
        for c in range(GRID):
            y0, y1 = (4 * r + 1) * height // (4 * GRID), (4 * r + 3) * height // (4 * GRID)
            x0, x1 = (4 * c + 1) * width // (4 * GRID), (4 * c + 3) * width // (4 * GRID)
            cell = gray[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
            bits.append(int(cell.mean() > 127))
    if bits[0] != 1 or bits[-1] != 0:
        raise ValueError("orientation markers not found: frame is rotated or not an index frame")
    return sum(b << n for n, b in enumerate(bits[1:-1]))


def write_index_video(
    path: str | os.PathLike,
    *,
    frames: int,
    fps: float = 30,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    times_s: Sequence[float] | None = None,
    gop: int = 10,
    preset: str = "ultrafast",
    x264_params: str | None = None,
    container_format: str | None = None,
) -> Path:
    """Write ``frames`` index frames of ``size`` (width, height) at ``fps``.

    ``rotation``: degrees counter-clockwise in the display matrix (PyAV's convention); the pixels are
    stored turned the other way, so a decoder that honours the matrix shows the upright index frame.
    ``times_s``: presentation times in seconds per frame (variable frame rate); default i / fps.
    Keyframes every ``gop`` frames and a low CRF keep the code readable after compression. x264's
    ``preset`` "ultrafast" writes no B frames; "medium" (x264's default) writes B frames that are
    references (b-pyramid) and B frames that are not; ``x264_params`` e.g. "open-gop=1".
    ``container_format``: e.g. "h264" for a raw elementary stream (packets without timestamps).
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 90000) if times_s is not None else 1 / rate
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        upright = index_frame(0, size)
        stored = np.rot90(upright, k=-(rotation // 90))
        stream.height, stream.width = stored.shape[:2]
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = gop
        if codec in ("libx264", "libx265"):
            stream.options = {"crf": "12", "preset": preset}
            if x264_params:
                stream.options = {**stream.options, "x264-params": x264_params}
        elif codec in ("libsvtav1", "av1"):
            stream.options = {"crf": "20", "preset": "12"}
        elif codec == "mpeg4":
            stream.codec_context.qmax = 4  # mpeg4 has no crf; cap the quantizer instead
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.ascontiguousarray(np.rot90(index_frame(i, size), k=-(rotation // 90)))
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            seconds = times_s[i] if times_s is not None else i / rate
            frame.pts = round(Fraction(seconds) / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for n in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = n * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_png(path: Path) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb24"
        frame = av.VideoFrame.from_ndarray(index_frame(5, (32, 24)), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _remux_faststart(src: Path, dst: Path) -> None:
    """Copy the packets of ``src`` into ``dst`` with the index (moov) before the data."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def make_bad_inputs(directory: str | os.PathLike) -> dict[str, str]:
    """Write the awkward-input zoo into ``directory``; returns {file name: expected outcome}.

    Outcomes are "ok:N" (decodes to N frames) or an error type from ``decode.ERROR_TYPES``. The AV1
    case is "ok" only with PyAV (decord cannot open it); see BAD_INPUT_FINDINGS for details.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    (root / "empty.mp4").write_bytes(b"")
    expected["empty.mp4"] = "empty_file"
    real = write_index_video(root / "_real.mp4", frames=30)
    data = real.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    _remux_faststart(real, root / "_faststart.mp4")
    data = (root / "_faststart.mp4").read_bytes()
    (root / "truncated_faststart.mp4").write_bytes(data[: int(len(data) * 0.75)])
    for name in ("_real.mp4", "_faststart.mp4"):
        (root / name).unlink()
    expected["truncated_faststart.mp4"] = "ok:12"
    expected["truncated.mp4"] = "not_a_video"
    (root / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    expected["random_bytes.mp4"] = "not_a_video"
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    expected["text.mp4"] = "not_a_video"
    _write_audio_only(root / "audio_only.mp4")
    expected["audio_only.mp4"] = "no_video_stream"
    _write_png(root / "still_image.png")
    (root / "still_image.png").rename(root / "still_image.mp4")
    expected["still_image.mp4"] = "ok:1"
    write_index_video(root / "one_frame.mp4", frames=1)
    expected["one_frame.mp4"] = "ok:1"
    write_index_video(root / "twelve_frames.mp4", frames=12)
    expected["twelve_frames.mp4"] = "ok:12"
    write_index_video(root / "odd_dims_63x47.avi", frames=10, size=(63, 47), codec="mpeg4")
    expected["odd_dims_63x47.avi"] = "ok:10"
    write_index_video(root / "tiny_16x16.mp4", frames=10, size=(16, 16))
    expected["tiny_16x16.mp4"] = "ok:10"
    vfr_times = np.cumsum([0.0] + [0.02 if i % 3 else 0.07 for i in range(19)]).tolist()
    write_index_video(root / "vfr.mp4", frames=20, times_s=vfr_times)
    expected["vfr.mp4"] = "ok:20"
    write_index_video(root / "gray.mkv", frames=10, codec="ffv1", pix_fmt="gray")
    expected["gray.mkv"] = "ok:10"
    write_index_video(root / "ten_bit.mp4", frames=10, pix_fmt="yuv420p10le")
    expected["ten_bit.mp4"] = "ok:10"
    write_index_video(root / "name with spaces é ü.mp4", frames=10)
    expected["name with spaces é ü.mp4"] = "ok:10"
    write_index_video(root / "UPPER.MP4", frames=10)
    expected["UPPER.MP4"] = "ok:10"
    (root / "dir.mp4").mkdir(exist_ok=True)
    expected["dir.mp4"] = "not_a_video"
    link = root / "broken_link.mp4"
    if not link.is_symlink():
        link.symlink_to(root / "does_not_exist.mp4")
    expected["broken_link.mp4"] = "not_found"
    write_index_video(root / "rotated_90.mp4", frames=10, rotation=90)
    expected["rotated_90.mp4"] = "ok:10"
    write_index_video(root / "uhd_4k.mp4", frames=3, size=(3840, 2160))
    expected["uhd_4k.mp4"] = "ok:3"
    if os.geteuid() != 0:
        write_index_video(root / "no_permission.mp4", frames=3).chmod(0)
        expected["no_permission.mp4"] = "permission"
    write_index_video(root / "av1.mp4", frames=10, codec="libsvtav1")
    expected["av1.mp4"] = "ok:10"
    log.debug("bad inputs written to %s: %s", root, sorted(expected))
    return expected
