"""The closed vocabulary of ``error_type``: what a failed video's row may say, and which types resume retries.

Every failed video gets exactly one ``videos`` row with ``status=error`` and an ``error_type`` from
``ERROR_TYPES``; readers (query, report) and writers (the decode stage) share this list.
``RETRYABLE_ERROR_TYPES`` are the ones ``videoindex resume --retry-failed`` retries by default: they
depend on the machine or the moment, not on the file.
"""

from __future__ import annotations

ERROR_TYPE_DOC: dict[str, str] = {
    "not_found": "the file does not exist (or is a broken link)",
    "permission": "the file exists but may not be read",
    "empty_file": "the file has 0 bytes",
    "not_a_video": "no container format recognised (text, random bytes, truncated header, directory)",
    "no_video_stream": "a valid container without a video stream (audio only, subtitles)",
    "unsupported_codec": "the video codec has no decoder in the decoder used",
    "corrupt": "the container opened but decoding failed mid-stream",
    "timeout": "decoding took longer than decode.timeout_s",
    "decoder_crash": "the decoder raised an unexpected internal error or its process died",
    "out_of_memory": "decoding needed more than decode.max_memory_mb (or the machine ran out of memory)",
    "storage": "reading the bytes failed (object store or file system I/O); retryable",
}
ERROR_TYPES: tuple[str, ...] = tuple(ERROR_TYPE_DOC)
RETRYABLE_ERROR_TYPES: tuple[str, ...] = ("timeout", "storage", "decoder_crash", "out_of_memory")
