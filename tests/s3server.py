"""A real S3 endpoint for tests: moto's server on 127.0.0.1, IAM users with policies, failure injection.

Use the fixtures from a test module (``from tests.s3server import s3  # noqa: F401``) or list this
module in ``pytest_plugins``. Ray workers are other processes: they reach the server through the
endpoint URL and the key/secret carried in ``storage_options``, never through this process's environment.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.helpers import free_port

TEST_KEY = "testing"  # moto's default credentials while IAM checks are off
TEST_SECRET = "testing"


def s3_options(endpoint_url: str, key: str = TEST_KEY, secret: str = TEST_SECRET, **extra: Any) -> dict:
    """s3fs storage_options for a moto endpoint (no region_name: moto and s3fs disagree on it)."""
    return {"client_kwargs": {"endpoint_url": endpoint_url}, "key": key, "secret": secret, **extra}


@dataclass
class S3Server:
    """moto's S3 (and IAM) served over HTTP from a thread of this process."""

    url: str
    server: Any = field(repr=False)

    def options(self, key: str = TEST_KEY, secret: str = TEST_SECRET, **extra: Any) -> dict:
        return s3_options(self.url, key, secret, **extra)

    def fs(self, key: str = TEST_KEY, secret: str = TEST_SECRET, **extra: Any) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options(key, secret, **extra))

    def client(self, service: str, key: str = TEST_KEY, secret: str = TEST_SECRET) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)  # fmt: skip

    def reset(self) -> None:
        """Forget every bucket, user and key, and switch IAM checks off again."""
        import requests

        requests.post(f"{self.url}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()

    def user(self, name: str, statements: list[dict[str, Any]]) -> tuple[str, str]:
        """An IAM user with an inline policy; returns its (access key id, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce_iam(self) -> None:
        """From now on every request is signed-checked and authorised against IAM policies (403 if not)."""
        import requests

        requests.post(f"{self.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(url=f"http://{host}:{port}", server=server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture()
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A clean moto S3 for one test: no buckets, IAM checks off, fresh s3fs instances."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, TEST_KEY)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata probes
    s3_server.reset()
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.reset()


FAILURES = {  # FlakyProxy.mode -> (HTTP status, S3 error code, message)
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class FlakyProxy:
    """An HTTP proxy in front of an endpoint that fails the next ``fail`` requests, then forwards.

    ``mode`` "503" answers S3's SlowDown error (retried by s3fs), "500" its InternalError (not retried by
    s3fs: one request per failure), "reset" closes the connection without an answer.
    ``requests`` counts every request seen, failed or forwarded; ``log`` holds (method, path, body bytes
    sent back) of every forwarded request, so a test can count GETs and bytes read per object.
    """

    def __init__(self, target_url: str) -> None:
        self.target = target_url.removeprefix("http://")
        self.fail = 0
        self.mode = "503"
        self.requests = 0
        self.fail_when: Any = None  # (method, path, headers) -> bool: fail those requests too
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _should_fail(self, method: str = "", path: str = "", headers: Any = None) -> bool:
        with self.lock:
            self.requests += 1
            if self.fail > 0:
                self.fail -= 1
                return True
            return bool(self.fail_when and self.fail_when(method, path, headers or {}))

    def reads_of(self, key: str) -> tuple[int, int]:
        """(GET requests, bytes returned) for paths that end with ``key`` (an object's key)."""
        with self.lock:
            gets = [n for method, path, n in self.log if method == "GET" and path.split("?")[0].endswith(key)]
        return len(gets), sum(gets)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._should_fail(self.command, self.path, dict(self.headers.items())):
                    if proxy.mode == "reset":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    status, code, message = FAILURES[proxy.mode]
                    error = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                             f"<Message>{message}</Message></Error>").encode()  # fmt: skip
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                skip = ("transfer-encoding", "connection") + (
                    () if self.command == "HEAD" else ("content-length",)
                )
                for key, value in response.getheaders():
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with proxy.lock:
                    proxy.log.append((self.command, self.path, 0 if self.command == "HEAD" else len(data)))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
