"""PyAV (FFmpeg 8) reading: one forward pass that decodes each needed frame once and scales it at once.

Why this shape (figures: benchmarks/README.md, bench_decode.py): decoding dominates the CPU cost, and a
frame converted to full-resolution RGB before it is cut down costs as much again. So:

- Packets are demuxed once, in order, into *segments* (a GOP, cut at the next keyframe). A segment's
  frames take the presentation indices ``base .. base + n - 1`` in the order of their pts: at a keyframe
  no frame of the new segment is shown before a frame of the old one.
- A segment holding no needed frame is not decoded at all (sparse sampling skips whole GOPs); an open
  GOP (frames shown before its keyframe) gets the skipped segment before it fed as its references.
- Inside a decoded segment, a packet whose frame is not needed is decoded with ``skip_frame=NONREF``:
  the decoder drops it if no other frame refers to it (B frames), and decodes it otherwise.
- A needed frame is cut down as it comes, one at a time: converted to full-resolution RGB and resized
  with the reference resize (``scale="rgb"``, the image processor's pixels), or scaled straight from
  YUV by swscale (``scale="swscale"``: cheaper, about a grey level off); then turned upright.

A file whose packets have no usable pts falls back to a plain pass (decode every frame, count them in
output order), as does a segment that would break the ordering rule above.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from videoindex.stages.errors import DecodeError, library_message
from videoindex.stages.preprocess import resize_frames
from videoindex.stages.source import Source
from videoindex.stages.video import Frame, VideoMeta, VideoReader, rotate, stored_size

log = logging.getLogger(__name__)

DECODE_THREADS = 1  # a decode task holds one CPU slot; FFmpeg's own threads would take more
SCALER = Interpolation.BILINEAR  # swscale's bilinear widens its kernel when shrinking (antialiased)
SEGMENT_MAX_PACKETS = 512  # a longer GOP is cut at the first point where no frame crosses the cut
KEPT_SEGMENT_MAPS = 4  # pts maps of recent segments (the decoder still holds a few frames of them)
MAX_BAD_PACKETS = 25  # packets in a row the decoder rejects before the rest of the video counts as lost


def probe_pyav(source: Source) -> VideoMeta:
    """Container facts and the display rotation (which PyAV only shows on a decoded frame)."""
    with source.container() as container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", "probe", f"{source.uri}: no video stream", decoder="pyav")
        stream = container.streams.video[0]
        first = next(container.decode(stream), None)
        rotation = round((first.rotation if first is not None else 0) / 90) * 90
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, -90, 270):
            width, height = height, width
        return VideoMeta(
            frames=max(int(stream.frames or 0), 0),  # 0 when the container does not say
            fps=float(rate) if rate else 0.0,
            duration_s=duration,
            width=width,
            height=height,
            rotation=(-rotation) % 360,
            codec=stream.codec_context.codec.canonical_name,
            decoder="pyav",
        )


def count_packets(source: Source) -> int:
    """Video packets in the file (demux only): the frame count of containers that do not store it."""
    with source.container() as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size)


class _Scaler:
    """av.VideoFrame -> upright uint8[h,w,3] at ``size`` (or full size)."""

    def __init__(self, size: tuple[int, int] | None, rotation: int, scale: str) -> None:
        self.size, self.rotation, self.scale = size, rotation, scale
        self.stored = stored_size(size, rotation) if size is not None else None
        self.reformatter = VideoReformatter()  # one per pass: its swscale context is reused frame to frame

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None or self.scale == "rgb":
            rgb = self.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
            upright = np.ascontiguousarray(rotate(rgb, self.rotation))
            return upright if self.size is None else resize_frames(upright[None], self.size)[0]
        height, width = self.stored
        rgb = self.reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                        interpolation=SCALER, threads=1)  # fmt: skip
        return np.ascontiguousarray(rotate(rgb.to_ndarray(), self.rotation))


class _PlainPassNeeded(Exception):
    """The packets do not allow the segment pass (no pts, or frames shown across a keyframe)."""


class _StreamLost(Exception):
    """The rest of the stream cannot be decoded: the pass ends, later frames repeat the last good one."""


class PyAVReader(VideoReader):
    """Forward-only PyAV decoding over one Source (local path or one remote file object)."""

    def __init__(self, source: Source, probe: VideoMeta | None = None, *, scale: str = "rgb") -> None:
        self._source, self.scale = source, scale
        probe = probe or probe_pyav(source)
        frames = probe.frames or count_packets(source)  # mkv does not say: count packets
        duration = probe.duration_s or (frames / probe.fps if probe.fps else 0.0)
        self.meta = dataclasses.replace(probe, frames=frames, duration_s=duration, decoder="pyav")
        self.frames_decoded = 0  # frames that came out of the decoder (the rest were skipped)
        self.bad_packets = 0  # packets the decoder rejected after good frames (the video's errors row)
        self.first_bad: str | None = None

    def frames(self, indices: Sequence[int], size: tuple[int, int] | None) -> Iterator[Frame]:
        """One pass from the start (see VideoReader.frames); each call is a new pass."""
        wanted = sorted(set(indices))
        if not wanted:
            return
        yielded = -1
        try:
            for item in self._pass(wanted, size, plain=False):
                yielded = item[0]
                yield item
            return
        except _PlainPassNeeded as why:
            log.info("%s: %s; decoding every frame instead", self._source.uri, why)
        yield from self._pass([i for i in wanted if i > yielded], size, plain=True, after=yielded)

    def _pass(self, wanted: list[int], size: tuple[int, int] | None, *, plain: bool, after: int = -1
              ) -> Iterator[Frame]:  # fmt: skip
        with self._source.container() as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = DECODE_THREADS
            scaler = _Scaler(size, self.meta.rotation, self.scale)
            run = _Pass(container, stream, wanted, scaler, self._source.uri)
            try:
                yield from (run.plain(after) if plain else run.segments())
            finally:
                self.frames_decoded += run.decoded
                self.bad_packets += run.bad_packets
                self.first_bad = self.first_bad or run.first_bad

    def close(self) -> None:
        self._source.close()


class _Pass:
    """The state of one pass: which frames are wanted, what came out, what to repeat at the end."""

    def __init__(self, container: Any, stream: Any, wanted: list[int], scale: _Scaler, uri: str) -> None:
        self.container, self.stream, self.scale, self.uri = container, stream, scale, uri
        self.codec = stream.codec_context
        self.wanted, self.want = wanted, set(wanted)
        self.last: tuple[int, av.VideoFrame] | None = None  # the latest frame out of the decoder
        self.done = -1  # highest index yielded
        self.decoded = 0
        self.bad_packets = self.bad_in_a_row = 0
        self.first_bad: str | None = None
        self.maps: deque[dict[int, int]] = deque(maxlen=KEPT_SEGMENT_MAPS)  # pts -> index, per segment

    # ------------------------------------------------------------------ segment pass

    def segments(self) -> Iterator[Frame]:
        try:
            yield from self._segments()
        except _StreamLost as why:
            log.warning("%s: %s; the video is indexed up to its last good frame", self.uri, why)
        yield from self._drain()  # the frames the decoder still holds for reordering
        yield from self._repeat_last()

    def _segments(self) -> Iterator[Frame]:
        base, segment, skipped, last_max = 0, [], None, None
        for packet in self._packets():
            if segment and (packet.is_keyframe or self._cuttable(segment, packet)):
                last_max = self._order(segment, base, last_max)
                yield from self._segment(segment, base, skipped)
                skipped = None if self._needed(base, len(segment)) else segment
                base += len(segment)
                segment = []
                if base > self.wanted[-1]:
                    break  # every wanted frame is behind us: read no further
            segment.append(packet)
        if segment:
            self._order(segment, base, last_max)
            yield from self._segment(segment, base, skipped)

    def _packets(self) -> Iterator[Any]:
        try:
            for packet in self.container.demux(self.stream):
                if packet.size:
                    yield packet
        except av.error.FFmpegError as exc:  # a file cut short: index up to its last good packet
            if self.last is None and self.done < 0 and not self.maps:
                raise
            log.warning("%s: pyav stopped reading: %s", self.uri, library_message(exc))

    @staticmethod
    def _cuttable(segment: list[Any], packet: Any) -> bool:
        """A long GOP may be cut before ``packet`` when every later frame is shown after every earlier one
        (later packets have pts >= their dts >= this packet's dts)."""
        if len(segment) < SEGMENT_MAX_PACKETS or packet.dts is None:
            return False
        return max(p.pts for p in segment) < packet.dts

    def _order(self, segment: list[Any], base: int, last_max: int | None) -> int:
        """Give the segment's pts their presentation indices; returns the segment's largest pts."""
        pts = [p.pts for p in segment]
        if None in pts or len(set(pts)) != len(pts):
            raise _PlainPassNeeded("packets without distinct pts")
        if last_max is not None and min(pts) <= last_max:
            raise _PlainPassNeeded("a frame is shown before the keyframe of an earlier segment")
        self.maps.append({p: base + rank for rank, p in enumerate(sorted(pts))})
        return max(pts)

    def _needed(self, base: int, count: int) -> bool:
        import bisect

        k = bisect.bisect_left(self.wanted, base)
        return k < len(self.wanted) and self.wanted[k] < base + count

    def _segment(self, segment: list[Any], base: int, skipped: list[Any] | None) -> Iterator[Frame]:
        if not self._needed(base, len(segment)):
            return
        index_of = self.maps[-1]
        first_key = index_of[segment[0].pts]
        if skipped is not None and first_key != base:  # open GOP: its leading frames need the last one
            for packet in skipped:  # as references only: none of its frames is wanted
                yield from self._feed(packet, skip=True)
        for packet in segment:
            yield from self._feed(packet, skip=index_of[packet.pts] not in self.want)

    def _feed(self, packet: Any, *, skip: bool) -> Iterator[Frame]:
        self.codec.skip_frame = "NONREF" if skip else "DEFAULT"
        try:
            frames = self.codec.decode(packet)
        except av.error.FFmpegError as exc:
            if self.last is None:  # nothing decodes: the video is corrupt
                raise
            self._bad_packet(exc)
            return
        self.bad_in_a_row = 0
        for frame in frames:
            yield from self._frame(frame)

    def _bad_packet(self, exc: Exception) -> None:
        """A packet the decoder rejects after good frames: counted (the video's errors row says how many),
        and after MAX_BAD_PACKETS in a row the rest of the video is given up on as lost."""
        self.bad_packets += 1
        self.bad_in_a_row += 1
        if self.first_bad is None:
            self.first_bad = library_message(exc)
            log.warning("%s: pyav could not decode a packet: %s", self.uri, self.first_bad)
        if self.bad_in_a_row >= MAX_BAD_PACKETS:
            raise _StreamLost(f"{MAX_BAD_PACKETS} packets in a row could not be decoded")

    def _drain(self) -> Iterator[Frame]:
        self.codec.skip_frame = "DEFAULT"
        try:
            frames = self.codec.decode(None)
        except av.error.FFmpegError as exc:
            log.warning("%s: pyav could not flush the decoder: %s", self.uri, library_message(exc))
            return
        for frame in frames:
            yield from self._frame(frame)

    def _frame(self, frame: av.VideoFrame) -> Iterator[Frame]:
        index = next((m[frame.pts] for m in reversed(self.maps) if frame.pts in m), None)
        if index is None:
            return
        yield from self._emit(index, frame)

    def _emit(self, index: int, frame: av.VideoFrame) -> Iterator[Frame]:
        self.decoded += 1
        if self.last is None or index > self.last[0]:
            self.last = (index, frame)  # the latest frame in presentation order
        if index in self.want and index > self.done:
            self.done = index
            yield index, self.scale(frame), self._time(frame)

    def _time(self, frame: av.VideoFrame) -> float:
        """Presentation time in seconds (frames out of a flush carry no time base of their own)."""
        return float(frame.pts * self.stream.time_base) if frame.pts is not None else float(frame.time or 0.0)

    def _repeat_last(self) -> Iterator[Frame]:
        """Past the real end: the last decodable frame once more (VideoReader.frames)."""
        if self.last is not None and self.done < self.wanted[-1]:
            index, frame = self.last
            yield index, self.scale(frame), self._time(frame)

    # ------------------------------------------------------------------ plain pass

    def plain(self, after: int) -> Iterator[Frame]:
        """Decode every frame and number them in output order; yield the wanted ones past ``after``."""
        self.done = after
        index = -1
        try:
            for frame in self.container.decode(self.stream):
                index += 1
                yield from self._emit(index, frame)
                if index >= self.wanted[-1]:
                    break
        except av.error.FFmpegError as exc:
            if index < 0:
                raise
            self.bad_packets += 1
            self.first_bad = self.first_bad or library_message(exc)
            log.warning("%s: pyav stopped after %d frames: %s", self.uri, index + 1, self.first_bad)
        yield from self._repeat_last()
