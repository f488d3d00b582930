"""The API key is checked before any body byte is read; every body is capped while it streams.

Issue 10, item 3: bodies used to be read and parsed (JSON on the event loop) before the key
was checked, and over-limit chunked bodies were read to the end before the refusal.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import make_settings
from tests.service.live import live_server

pytestmark = pytest.mark.timeout(180)
KEY = "s3cret"


class CountingBody:
    """An ASGI ``receive`` that serves ``total`` bytes in ``chunk`` pieces and counts what was pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total = total
        self.chunk = chunk
        self.pulled = 0

    async def __call__(self) -> dict[str, Any]:
        n = min(self.chunk, self.total - self.pulled)
        self.pulled += n
        return {"type": "http.request", "body": b" " * n, "more_body": self.pulled < self.total}


async def asgi_call(app: Any, method: str, path: str, headers: dict[str, str], body: CountingBody) -> Any:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }
    await app(scope, body, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(payload)


def test_no_key_is_refused_before_one_body_byte_is_read(tmp_path):
    app = create_app(make_settings(tmp_path, api_key=KEY))
    big = 19 * 1024 * 1024
    for path, ctype, declared in (
        ("/products/x", "application/json", True),
        ("/products/x", "application/json", False),  # chunked
        ("/inspect", "image/png", False),
        ("/products/x/references", "multipart/form-data; boundary=b", True),
    ):
        body = CountingBody(big)
        headers = {"content-type": ctype}
        if declared:
            headers["content-length"] = str(big)
        else:
            headers["transfer-encoding"] = "chunked"
        method = "PUT" if path == "/products/x" else "POST"
        status, hdrs, doc = asyncio.run(asgi_call(app, method, path, headers, body))
        assert status == 401 and doc["error"]["code"] == "unauthorized", (path, doc)
        assert body.pulled == 0, (path, body.pulled)
        assert hdrs[b"connection"] == b"close"  # the server never reads the body either


def test_json_bodies_are_capped_while_streaming_with_a_413(tmp_path):
    app = create_app(make_settings(tmp_path, api_key=KEY, max_json_bytes=64 * 1024))
    body = CountingBody(50 * 1024 * 1024, chunk=16 * 1024)
    headers = {"content-type": "application/json", "transfer-encoding": "chunked", "x-api-key": KEY}
    status, _, doc = asyncio.run(asgi_call(app, "PUT", "/products/x", headers, body))
    assert status == 413, doc
    assert doc["error"]["code"] == "payload_too_large" and doc["error"]["max_bytes"] == 64 * 1024
    assert body.pulled <= 64 * 1024 + 16 * 1024  # stopped at the first chunk past the cap
    declared = {"content-type": "application/json", "content-length": str(2 * 1024 * 1024), "x-api-key": KEY}
    body = CountingBody(2 * 1024 * 1024)
    status, _, doc = asyncio.run(asgi_call(app, "PUT", "/products/x", declared, body))
    assert status == 413 and doc["error"]["code"] == "payload_too_large" and body.pulled == 0


def test_json_limit_over_http(app_client):
    with app_client(max_json_bytes=4096) as (client, _):
        doc = {"object_name": "part", "dataset": "x" * 5000}
        r = client.put("/products/big", json=doc)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert r.json()["error"]["max_bytes"] == 4096
        assert client.put("/products/small", json={"object_name": "part"}).status_code == 201


def _upload(
    port: int, method: str, path: str, headers: dict[str, str], total: int, *, chunked: bool = True
) -> tuple[int, bytes, float]:
    """Send a body of up to ``total`` bytes, as curl does: on until the server hangs up.

    A server that answers early but keeps the connection open reads the whole body.
    ``chunked=False`` declares ``Content-Length`` and sends a JSON document of that size.
    Returns (bytes of body sent, what the server answered, seconds).
    """
    piece = 64 * 1024
    if chunked:
        chunk = b"x" * piece
        frames = iter(lambda: f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n", None)
        framing = {"Transfer-Encoding": "chunked"}
    else:
        doc = b'{"object_name": "' + b"x" * (total - 20) + b'"}'
        total = len(doc)
        frames = (doc[i : i + piece] for i in range(0, total, piece))
        framing = {"Content-Length": str(total)}
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in {**framing, **headers}.items()) + "\r\n"
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head.encode())
    s.setblocking(False)
    sent, answer, pending = 0, b"", memoryview(b"")
    try:
        while time.monotonic() - t0 < 60:
            readable, writable, _ = select.select([s], [s] if sent < total else [], [], 5)
            if readable:
                part = s.recv(65536)
                if not part:
                    break
                answer += part
                continue
            if not writable:
                break  # all sent (or the server neither reads nor answers)
            if not pending:
                pending = memoryview(next(frames))
            n = s.send(pending)
            pending = pending[n:]
            if not pending:
                sent += piece
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    return min(sent, total), answer, time.monotonic() - t0


def _status(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0].split(b" ")[1] if answer else b""


def test_live_over_limit_uploads_stop_early_and_health_stays_fast(tmp_path):
    limit = 1024 * 1024
    with live_server(tmp_path, ZSI_API_KEY=KEY, ZSI_MAX_IMAGE_BYTES=str(limit)) as url:
        port = int(url.rsplit(":", 1)[1])
        results: list[tuple[str, int, bytes, float]] = []
        jobs: list[tuple[str, str, str, dict[str, str], int, bool]] = [
            # 512 MB chunked uploads, without and with the key: refused after ~1 MB
            *[("chunked", "POST", "/inspect", {"Content-Type": "image/png"}, 512 << 20, True)] * 2,
            *[
                (
                    "chunked+key",
                    "POST",
                    "/inspect",
                    {"Content-Type": "image/png", "X-API-Key": KEY},
                    512 << 20,
                    True,
                )
            ]
            * 2,
            # answered (404) before the body is read: the rest of the body is not drained either
            (
                "unknown+key",
                "POST",
                "/inspect?product=nope",
                {"Content-Type": "image/png", "X-API-Key": KEY},
                512 << 20,
                True,
            ),
            # 4 x 19 MB JSON without the key: refused before reading, nothing parsed
            *[("json", "PUT", "/products/x", {"Content-Type": "application/json"}, 19 << 20, False)] * 4,
        ]

        def upload(job: tuple[str, str, str, dict[str, str], int, bool]) -> None:
            name, method, path, headers, total, chunked = job
            results.append((name, *_upload(port, method, path, headers, total, chunked=chunked)))

        workers = [threading.Thread(target=upload, args=(job,)) for job in jobs]
        for w in workers:
            w.start()
        health = []
        while any(w.is_alive() for w in workers):
            t = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.05)
        for w in workers:
            w.join()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert len(results) == len(jobs)
    # Socket buffers on both sides hold a few MB; nothing near what was offered was read.
    slack = 16 * 1024 * 1024
    for name, sent, answer, seconds in results:
        assert sent < limit + slack, (name, sent, answer[:80])
        assert seconds < 30, (name, seconds)
        if answer:  # (a reset may swallow the answer; its status is checked in the ASGI tests)
            want = {"chunked+key": b"413", "unknown+key": b"404"}.get(name, b"401")
            assert _status(answer) == want, (name, answer[:80])
    assert max(health, default=0.0) < 2.0, health
