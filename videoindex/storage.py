"""Object-store access through fsspec, with one retry helper for transient failures.

Every path the job touches (local dirs, file://, s3://, gs://, az://) goes through here, so local runs
exercise the same code as cluster runs against object storage.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth retrying: throttling, 5xx, resets. Permanent ones (missing key, denied) are not.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
TRANSIENT_MARKERS = ("SlowDown", "Throttl", "InternalError", "ServiceUnavailable", "503", "500", "RequestTimeout",
                     "Connection reset", "timed out")  # fmt: skip


def filesystem(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path inside it (no trailing slash)."""
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in TRANSIENT_MARKERS)


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay_s: float = 0.2) -> T:
    """Call fn, retrying transient object-store errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay_s * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning(
                "%s: transient error (%s), retry %d/%d in %.2fs", what, exc, attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object so that no reader sees it half-written.

    Object stores make a PUT visible at once; on a local filesystem we write a temporary sibling
    and rename it over the target.
    """

    def _write() -> None:
        if is_local(fs):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{random.getrandbits(48):012x}"
            with fs.open(tmp, "wb") as fh:
                fh.write(data)
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, data)

    with_retries(_write, what=f"write {path}")


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(with_retries(lambda: fs.cat_file(path), what=f"read {path}"))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return with_retries(lambda: fs.exists(path), what=f"stat {path}")


def list_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """File names (not paths) under a prefix, recursively, in one listing; [] if it does not exist."""

    def _find() -> list[str]:
        try:
            found = fs.find(path)
        except FileNotFoundError:
            return []
        prefix = path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)

    return with_retries(_find, what=f"list {path}")
