"""The service's pure-ASGI middleware: API key, body caps, request metrics, demo labels.

Runs in front of FastAPI, so it decides BEFORE any body is read or parsed:

1. API key (when ``ZSI_API_KEY`` is set): every path except the open ones
   (:data:`OPEN_PATHS`, the API description) needs ``X-API-Key``; a request without it
   is answered 401 without reading one byte of its body.
2. Body cap per route (:meth:`ServiceMiddleware.body_limit`): a declared
   ``Content-Length`` over the cap is refused at once; a chunked body is counted while
   it streams and refused (413) as soon as it passes the cap. The connection is then
   closed, so the rest of an over-limit body is never read; so is every answer given
   before the app read the whole body (an unknown product, say).
3. Per-route request metrics, and in demo mode ``demo``/``warning`` on every JSON answer.

Every refusal here is the service's JSON error shape.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.schemas import DEMO_WARNING

if TYPE_CHECKING:
    from service.deps import Services

#: Paths answered without an API key: liveness, readiness.
OPEN_PATHS = frozenset({"/health", "/ready"})
#: The API description (Swagger UI and the OpenAPI document it loads): open, so that
#: /docs works in a browser; it holds the schema only, never data.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})
DOCS_PREFIX = "/docs-static/"


class _BodyTooLarge(Exception):
    """Raised into the app by the capped ``receive``; the middleware has answered 413."""


def is_open_path(path: str) -> bool:
    """True for the paths that never need the API key."""
    return path in OPEN_PATHS or path in DOCS_PATHS or path.startswith(DOCS_PREFIX)


class ServiceMiddleware:
    """Pure ASGI: API key and body caps before the app, request metrics, demo labels."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    # ------------------------------------------------------------------ limits
    def body_limit(self, path: str) -> tuple[int, str]:
        """The largest request body of ``path`` in bytes (multipart framing included) and its setting."""
        s = self.services.settings
        path = path.rstrip("/") or "/"
        if path == "/inspect":
            return s.max_image_bytes, "ZSI_MAX_IMAGE_BYTES"
        if path.startswith("/products/") and path.endswith(("/references", "/calibrate")):
            # golden-image uploads, and calibration with images sent (a JSON calibration body is
            # capped at ZSI_MAX_JSON_BYTES by its route)
            return (
                s.max_image_bytes * s.max_reference_images,
                "ZSI_MAX_IMAGE_BYTES x ZSI_MAX_REFERENCE_IMAGES",
            )
        return s.max_json_bytes, "ZSI_MAX_JSON_BYTES"

    def _key_ok(self, scope: Scope) -> bool:
        expected = self.services.settings.api_key
        if expected is None or is_open_path(scope.get("path", "")):
            return True
        for name, value in scope.get("headers") or []:
            if name.lower() == b"x-api-key":
                return secrets.compare_digest(value, expected.get_secret_value().encode())
        return False

    # --------------------------------------------------------------------- ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        demo = self.services.demo and path != "/openapi.json"
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False, "refused": False}

        async def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            if demo:
                body = {**body, "demo": True, "warning": DEMO_WARNING}
            payload = json.dumps(body).encode()
            state["status"] = status
            state["started"] = True
            raw_headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": payload})

        headers = dict(scope.get("headers") or [])
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        if not self._key_ok(scope):
            # With an unread body, close the connection: the server then never reads it.
            await reply(
                401,
                error_body("unauthorized", "missing or wrong API key: send it in the X-API-Key header"),
                {"WWW-Authenticate": "X-API-Key", **({"Connection": "close"} if has_body else {})},
            )
            self._observe(scope, state["status"], started)
            return

        limit, setting = self.body_limit(path)

        def too_large() -> dict[str, Any]:
            return error_body(
                "payload_too_large",
                f"the request body is larger than the limit of {limit} bytes ({setting})",
                max_bytes=limit,
            )

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await reply(413, too_large(), {"Connection": "close"})
            self._observe(scope, state["status"], started)
            return

        received = 0
        state["body_done"] = not has_body

        async def capped_receive() -> Message:
            nonlocal received
            if state["refused"]:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                state["body_done"] = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now and stop reading: the rest of the body is never pulled in.
                    state["refused"] = True
                    if not state["started"]:
                        await reply(413, too_large(), {"Connection": "close"})
                    raise _BodyTooLarge()
            return message

        start_message: dict[str, Any] = {}
        body_parts: list[bytes] = []

        async def tagging_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 is out; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                if not state["body_done"]:
                    # Answered before the body was read (an unknown product, say): close, or the
                    # server would read and discard the rest of a body of any size.
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                hdrs = dict(message.get("headers") or [])
                if demo and hdrs.get(b"content-type", b"").startswith(b"application/json"):
                    start_message.update(message)
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and start_message:
                body_parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(body_parts)
                try:
                    doc = json.loads(body)
                    if isinstance(doc, dict):
                        doc["demo"] = True
                        doc["warning"] = DEMO_WARNING
                        body = json.dumps(doc).encode()
                except ValueError:
                    pass
                kept = [(k, v) for k, v in start_message.get("headers", []) if k.lower() != b"content-length"]
                kept.append((b"content-length", str(len(body)).encode()))
                await send({**start_message, "headers": kept})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, capped_receive, tagging_send)
        except _BodyTooLarge:
            pass  # answered 413 in capped_receive
        except Exception:
            if not state["refused"]:
                raise
        finally:
            self._observe(scope, state["status"], started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or "unmatched"
        self.services.metrics.requests.labels(route=label, status=str(status)).inc()
        self.services.metrics.latency.labels(route=label).observe(time.perf_counter() - started)


__all__ = ["DOCS_PATHS", "OPEN_PATHS", "ServiceMiddleware", "is_open_path"]
