"""HTTP to a server opd does not control (a served teacher, a served student), with limits that
hold whatever the server does.

* A deadline for the whole request, from connecting to the last byte: httpx's timeouts are per
  read, so a server that sends one byte a second keeps a plain request open for ever. Every
  socket read and write here waits at most until the request's deadline (the network backend
  below bounds each one by the time left), so `timeout_s` is what it says.
* A cancel event: a request in flight stops within `CANCEL_POLL_S` once it is set (a second
  Ctrl-C, or another request of the same batch failing), however long the server takes.
* A size cap on the answer: a body over `max_bytes` is refused before it fills the memory.
* `api_key_env`: the name of an environment variable holding the server's key, sent as
  `Authorization: Bearer <key>` (the key itself is never in a config, a log or an error), and
  `tls_verify` / `ca_bundle` for https.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpcore
import httpx

CANCEL_POLL_S = 0.2  # how often a blocked read looks at the cancel event

_current = threading.local()  # this thread's request: its deadline and cancel event


class RequestCancelled(Exception):
    """The request was cancelled (its cancel event was set) while in flight."""


class ResponseTooLarge(Exception):
    """The answer's body is longer than the request's cap."""


class MissingApiKey(ValueError):
    """`api_key_env` names an environment variable that is not set."""


@dataclass
class Answer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.content)


def _bounded(timeout: float | None) -> float | None:
    """A socket timeout no later than this thread's request deadline."""
    deadline = getattr(_current, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


def _check_cancel() -> None:
    if any(event.is_set() for event in getattr(_current, "cancel", ())):
        raise RequestCancelled()


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # in short waits, so that a cancel is seen; a wait that ends empty-handed is no error
        # until the read's own timeout (or the request's deadline) has passed
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            _check_cancel()
            left = _bounded(None if until is None else until - time.monotonic())
            if left is not None and left <= 0:
                raise httpcore.ReadTimeout("no answer within the read timeout")
            try:
                return self._stream.read(max_bytes, CANCEL_POLL_S if left is None else min(CANCEL_POLL_S, left))
            except httpcore.ReadTimeout:
                if left is not None and left <= CANCEL_POLL_S:
                    raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _check_cancel()
        self._stream.write(buffer, _bounded(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> "_DeadlineStream":
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self):
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        _check_cancel()
        return _DeadlineStream(self._backend.connect_tcp(host, port, _bounded(timeout), local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _bounded(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (its request and error mapping), its connection pool on the bounded
    backend (httpx has no argument for a pool's network backend, so the pool is replaced)."""

    def __init__(self, verify, limits: httpx.Limits):
        ssl_context = httpx.create_ssl_context(verify=verify) if not hasattr(verify, "wrap_socket") else verify
        super().__init__(verify=ssl_context, limits=limits)
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend())


def api_key_header(api_key_env: str | None, what: str) -> dict:
    """{"Authorization": "Bearer <key>"} from the environment variable `api_key_env` ({} without one)."""
    if api_key_env is None:
        return {}
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise MissingApiKey(f"{what}.api_key_env={api_key_env}: the environment variable {api_key_env} is not set "
                            f"(export it with the server's API key)")
    return {"Authorization": f"Bearer {key}"}


def tls_verification(tls_verify: bool, ca_bundle: str | None, what: str):
    """httpx's `verify`: a CA bundle file, True (the system's CAs) or False (no check)."""
    if ca_bundle is not None:
        if not os.path.isfile(ca_bundle):
            raise FileNotFoundError(f"{what}.ca_bundle={ca_bundle}: no such file")
        import ssl

        return ssl.create_default_context(cafile=ca_bundle)
    return tls_verify


def make_client(base_url: str, timeout_s: float, connections: int = 1, headers: dict | None = None,
                verify=True, connect_s: float = 10.0) -> httpx.Client:
    """An httpx client whose requests (through `request`) keep to their deadline."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, connect_s)),
                        headers=headers or {}, transport=_DeadlineTransport(verify, limits))


@contextmanager
def _request_scope(deadline: float, cancel: tuple[threading.Event, ...]):
    saved = getattr(_current, "deadline", None), getattr(_current, "cancel", ())
    _current.deadline, _current.cancel = deadline, cancel
    try:
        yield
    finally:
        _current.deadline, _current.cancel = saved


def request(client: httpx.Client, method: str, path: str, json_body=None, timeout_s: float | None = None,
            max_bytes: int | None = None, cancel: tuple[threading.Event | None, ...] = ()) -> Answer:
    """One request that ends by `timeout_s` after it starts (httpx.TimeoutException otherwise),
    stops when one of the `cancel` events is set (RequestCancelled), and refuses a body over
    `max_bytes` (ResponseTooLarge)."""
    timeout_s = timeout_s if timeout_s is not None else client.timeout.read
    with _request_scope(time.monotonic() + timeout_s, tuple(e for e in cancel if e is not None)):
        with client.stream(method, path, json=json_body) as response:
            declared = response.headers.get("content-length", "")
            if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(f"the answer is {int(declared):,} bytes (Content-Length), over the cap of "
                                       f"{max_bytes:,}")
            body, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ResponseTooLarge(f"the answer is over the cap of {max_bytes:,} bytes")
                body.append(chunk)
            return Answer(response.status_code, b"".join(body))
