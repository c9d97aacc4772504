"""Object-store access through fsspec, with one retry helper for transient failures.

Every path the job touches (local dirs, file://, s3://, gs://, az://) goes through here, so local runs
exercise the same code as cluster runs against object storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Transient: throttling, 5xx, timeouts, resets; retried with backoff. Permanent: missing, denied, invalid.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "InternalError", "InternalFailure",
    "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "OperationAborted", "EC2ThrottledException", "IDPCommunicationError",
    "408", "429", "500", "502", "503", "504",
})  # fmt: skip
PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "NoSuchBucket", "NoSuchKey", "NoSuchUpload", "NoSuchVersion",
    "InvalidBucketName", "InvalidObjectState", "RequestTimeTooSkewed", "400", "401", "403", "404",
})  # fmt: skip
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# errno values fsspec backends give transient failures (s3fs: SlowDown/503 -> EBUSY, 500 -> EREMOTEIO)
TRANSIENT_ERRNO = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                             errno.ECONNREFUSED, errno.EPIPE, getattr(errno, "EREMOTEIO", 121)})  # fmt: skip
# Exception class names of HTTP/SDK layers that mean "the connection, not the request, failed"
# (botocore, aiohttp, requests, urllib3, google-api-core, azure-core), matched by name to avoid imports.
TRANSIENT_TYPES = frozenset({
    "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ResponseParserError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientConnectorError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError",
    "ChunkedEncodingError", "ServiceRequestError", "ServiceResponseError", "TooManyRequests",
    "InternalServerError", "BadGateway", "ServiceUnavailable", "GatewayTimeout", "RetryError",
})  # fmt: skip
TRANSIENT_MARKERS = ("SlowDown", "Throttl", "reduce your request rate", "ServiceUnavailable",
                     "Connection reset", "timed out")  # fmt: skip
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
)  # fmt: skip


def filesystem(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path inside it (no trailing slash).

    Listings are never cached on remote filesystems: other processes (actors, other drivers) write
    markers and tables while this one runs, and s3fs's ``info``/``cat`` trust a stale parent listing.
    """
    options = dict(storage_options or {})
    if (fsspec.core.split_protocol(uri)[0] or "file") not in ("file", "local"):
        options.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (s3fs raises OSError from the botocore ClientError)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def error_code(exc: BaseException) -> str | None:
    """The service's error code (``NoSuchKey``, ``SlowDown``, ``503``) of an SDK error or its cause."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, Mapping) and isinstance(response.get("Error"), Mapping):
            code = response["Error"].get("Code")
            if code:
                return str(code)
    return None


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, Mapping):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status_code", "status", "code"):  # gcsfs HttpError, aiohttp, azure-core
        value = getattr(err, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying (throttling, 5xx, timeouts, connection resets).

    Looks at the service's error code first (through s3fs's translated OSError to the botocore
    ClientError behind it), then the HTTP status, then the exception types of the HTTP layers.
    Missing objects, denied access and invalid requests are permanent.
    """
    code = error_code(exc)
    if code in PERMANENT_CODES:
        return False
    if code in TRANSIENT_CODES:
        return True
    chain = _chain(exc)
    for err in chain:
        status = _http_status(err)
        if status is not None and status >= 400:
            return status in TRANSIENT_STATUS
    if isinstance(chain[0], PERMANENT_ERRORS):
        return False
    for err in chain:
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if any(t.__name__ in TRANSIENT_TYPES for t in type(err).__mro__):
            return True
        if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNO:
            return True
    text = " ".join(f"{type(err).__name__}: {err}" for err in chain)
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


def _write_local(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """``write(fh)`` into a temporary sibling, renamed over ``path`` once whole (atomic)."""
    head, name = path.rsplit("/", 1)
    fs.makedirs(head, exist_ok=True)
    # Dot-prefixed: dataset readers (pyarrow, DuckDB globs over *.parquet, Spark) skip it.
    tmp = f"{head}/.{name}.tmp-{random.getrandbits(48):012x}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)  # atomic; fails on a folder in the way (fs.mv would move into it)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _cannot_write(fs: fsspec.AbstractFileSystem, path: str, exc: OSError) -> OSError:
    """The error naming the object: s3fs says only "Access Denied"."""
    return type(exc)(f"cannot write {fs.unstrip_protocol(path)}: {_reason(exc)}")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object so that no reader sees it half-written.

    Object stores make a PUT visible at once; on a local filesystem we write a temporary sibling
    and rename it over the target.
    """

    def _write() -> None:
        if is_local(fs):
            _write_local(fs, path, lambda fh: fh.write(data))
        else:
            fs.pipe_file(path, data)

    try:
        with_retries(_write, what=f"write {path}")
    except (FileNotFoundError, PermissionError) as exc:
        raise _cannot_write(fs, path, exc) from exc


def write_streamed(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Like ``write_bytes`` for an object too large to hold in memory: ``write(fh)`` streams it. On a
    local filesystem into the dot-prefixed sibling that is renamed into place; on an object store as
    one upload (multipart: the object appears only when it is whole; a failed write is discarded). Not
    retried as a whole (``write`` may consume its input); the store's client retries each part. Errors
    of the target are named as ``write_bytes`` names them; those of what ``write`` reads pass as they are."""

    in_write = False  # an error raised while ``write`` runs is its own (a source it reads), not the target's

    def writing(fh: Any) -> None:
        nonlocal in_write
        in_write = True
        write(fh)
        in_write = False

    try:
        if is_local(fs):
            _write_local(fs, path, writing)
            return
        fh = fs.open(path, "wb")
        try:
            writing(fh)
        except BaseException:
            with contextlib.suppress(Exception):
                getattr(fh, "discard", lambda: None)()  # abort the multipart upload: nothing appears
                fh.closed = True  # and no close() at garbage collection uploads what was buffered
            raise
        fh.close()
    except (FileNotFoundError, PermissionError) as exc:
        if in_write:
            raise
        raise _cannot_write(fs, path, exc) from exc


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


def list_after(fs: fsspec.AbstractFileSystem, path: str, start_after: str = "") -> list[str]:
    """File names directly under ``path`` that sort after ``start_after``, sorted; [] if it does not exist.

    S3 lists from that point on (ListObjectsV2 StartAfter: one request per 1,000 names after it, however
    many come before); a local directory is scanned; other stores list the whole prefix and filter.
    """
    if type(fs).__name__ == "S3FileSystem":
        return with_retries(lambda: _s3_list_after(fs, path, start_after), what=f"list {path}")
    names = [n for n in list_names(fs, path) if "/" not in n]
    return [n for n in names if n > start_after]


def _s3_list_after(fs: Any, path: str, start_after: str) -> list[str]:
    bucket, _, key = fs._strip_protocol(path).partition("/")
    prefix = key.rstrip("/") + "/"
    names, token = [], None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        kwargs.update({"ContinuationToken": token} if token else {"StartAfter": prefix + start_after})
        page = fs.call_s3("list_objects_v2", **kwargs)
        names += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated"):
            return sorted(names)


def bucket_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket (container) of a path on an object store; None on local and other filesystems."""
    if is_local(fs) or getattr(fs, "root_marker", "/") != "":
        return None
    return fs._strip_protocol(path).split("/", 1)[0] or None


def root_problem(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Why a root on an object store cannot be used at all (its bucket is missing or denied), or None."""
    bucket = bucket_of(fs, path)
    if bucket is None:
        return None
    try:
        with_retries(lambda: fs.info(bucket), what=f"stat bucket {bucket}")
    except FileNotFoundError:
        return f"bucket {bucket!r} does not exist"
    except PermissionError as exc:
        return f"access to bucket {bucket!r} is denied ({_reason(exc)})"
    return None


def _reason(exc: BaseException) -> str:
    code = error_code(exc)
    text = str(exc).strip() or type(exc).__name__
    return f"{code}: {text}" if code and code not in text else text


def check_output_writable(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> None:
    """Write and delete a small probe object under the output root, before any work starts.

    Raises FileNotFoundError (missing bucket) or PermissionError (no write or delete permission) with a
    message naming the output and the bucket, so a bad OUTPUT fails in seconds, not after hours.
    """
    probe = join(root, f"_probe-{random.getrandbits(48):012x}")
    bucket = bucket_of(fs, root)
    where = f"output {uri}" + (f" (bucket {bucket!r})" if bucket else "")
    try:
        write_bytes(fs, probe, b"videoindex write probe\n")
    except FileNotFoundError as exc:
        problem = root_problem(fs, root) or f"cannot create {probe} ({_reason(exc)})"
        raise FileNotFoundError(f"{where} is unusable: {problem}. Create it or fix output.uri.") from exc
    except PermissionError as exc:
        raise PermissionError(
            f"{where} is not writable: {_reason(exc)}. Check the credentials (environment, profile, "
            "instance role or output.storage_options) and the bucket policy."
        ) from exc
    try:
        with_retries(lambda: fs.rm_file(probe), what=f"delete {probe}")
    except PermissionError as exc:
        raise PermissionError(
            f"{where} allows writes but not deletes ({_reason(exc)}); resume and retries need both."
        ) from exc
