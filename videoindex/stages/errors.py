"""Decode errors: the exception a bad video raises, and the mapping of any exception to an error type.

The message names the URI, the decoder, the stage (open | probe | decode) and the library's own words;
the type is one of ``format.errortypes.ERROR_TYPES``. Recovered problems (decord -> PyAV fallback) are
rows of the ``errors`` table with ``fatal=false``.
"""

from __future__ import annotations

import re
from typing import Any

import av

from videoindex import storage
from videoindex.format.errortypes import ERROR_TYPE_DOC, ERROR_TYPES


class DecodeError(Exception):
    """A video that cannot be (fully) decoded: ``error_type`` in ERROR_TYPES, ``stage`` open|probe|decode."""

    def __init__(self, error_type: str, stage: str, message: str, decoder: str | None = None) -> None:
        if error_type not in ERROR_TYPE_DOC:
            raise ValueError(f"unknown error_type {error_type!r}; use one of {ERROR_TYPES}")
        super().__init__(message)
        self.error_type = error_type
        self.stage = stage
        self.decoder = decoder
        self.message = message

    def __reduce__(self) -> Any:  # keeps the attributes when pickled to another Ray worker
        return (DecodeError, (self.error_type, self.stage, self.message, self.decoder))


_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"cannot find video stream|no video stream", "no_video_stream"),
    (r"decoder not found|unsupported codec|codec not (found|supported)|no decoder", "unsupported_codec"),
    (r"invalid data found|moov atom not found|unknown format|error reading|could not find codec "
     r"parameters|failed to measure duration", "not_a_video"),
    (r"av_read_frame failed|partial file|error while decoding|corrupt", "corrupt"),
    (r"cannot allocate memory|can't allocate memory|out of memory|bad_alloc", "out_of_memory"),
    (r"timed? ?out", "timeout"),
)  # fmt: skip


def library_message(exc: BaseException) -> str:
    """The library's own message, without decord's log prefix and C++ stack trace."""
    text = str(exc).split("\n\nStack trace")[0].strip()
    text = re.sub(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)
    return text[:500] or type(exc).__name__


def classify_error(
    exc: BaseException,
    *,
    size_bytes: int | None = None,
    stage: str,
    decoder: str | None = None,
    uri: str | None = None,
) -> DecodeError:
    """Map any exception met while opening or decoding to a DecodeError with a specific message."""
    if isinstance(exc, DecodeError):
        return exc
    text = library_message(exc)
    where = f"{uri}: " if uri else ""
    error_type = _error_type(exc, text.lower(), size_bytes, stage)
    message = f"{where}{decoder or 'decoder'} failed at {stage} ({error_type}): {type(exc).__name__}: {text}"
    return DecodeError(error_type, stage, message, decoder=decoder)


def _error_type(exc: BaseException, text: str, size_bytes: int | None, stage: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "permission"
    if size_bytes == 0:
        return "empty_file"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return "not_a_video"
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    if not isinstance(exc, av.error.FFmpegError) and storage.is_transient(exc):
        return "storage"  # the bytes did not come (connection reset, throttled, a read timed out)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, av.error.DecoderNotFoundError):
        return "unsupported_codec"
    if isinstance(exc, av.error.InvalidDataError) and stage != "decode":
        return "not_a_video"
    for pattern, error_type in _PATTERNS:
        if re.search(pattern, text):
            return "corrupt" if stage == "decode" and error_type == "not_a_video" else error_type
    if isinstance(exc, av.error.FFmpegError | RuntimeError) or type(exc).__name__ == "DECORDError":
        return "corrupt" if stage == "decode" else "not_a_video"
    if isinstance(exc, OSError):
        return "storage"  # fsspec and object-store errors not recognised above
    return "decoder_crash"
