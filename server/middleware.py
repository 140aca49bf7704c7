"""ASGI middleware that ``prescore-serve`` adds to vLLM's app (through vLLM's ``--middleware``).

:class:`RequestGuard` closes two gaps of vLLM's OpenAI server:

* **API key on every route.** vLLM's own ``--api-key`` check only guards paths under ``/v1``,
  ``/v2``, ``/inference`` and ``/cohere``; ``/metrics``, ``/tokenize``, ``/version``, the docs
  and the schema stay open. With a key configured (``--api-key`` or ``VLLM_API_KEY``, the same
  sources vLLM reads) this guard asks for ``Authorization: Bearer <key>`` on every path except
  the liveness/readiness probes (``/health``, ``/ping``), which orchestrators call without
  credentials and which reveal nothing.
* **Request body size.** vLLM accepts bodies of any size; a multi-gigabyte JSON body would be
  buffered and parsed. Bodies above ``--max-request-body-bytes`` (default 8 MiB, far above the
  largest prompt the context allows) are refused with 413, whether announced by
  ``Content-Length`` or streamed in chunks.
* **Per-request prescore controls checked on the raw body.** A JSON request's
  ``vllm_xargs`` controls (``prescore_keep_ratio``, ...) are validated before vLLM parses
  the body, so a bad control is a 400 on streaming requests too (vLLM admits a stream after
  its 200 has started and would report the refusal inside the stream), and a JSON ``true``
  is refused where a number is expected (vLLM's request model would read it as 1).

Refusals use the OpenAI error schema (``{"error": {"message", "type", "param", "code"}}``).
The settings come from the server's parsed arguments (``app.state.args``), so the guard also
works when added to plain ``vllm serve`` with ``--middleware
prescore_backend.server.middleware.RequestGuard`` (it then uses the default body limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = frozenset({"/health", "/ping"})


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> bytes:
    """The body of an OpenAI-style error response."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code or status}}).encode()


async def _send_error(send, status: int, message: str, type_: str, headers=()) -> None:
    body = openai_error(status, message, type_)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def controls_error(body: bytes) -> str | None:
    """Why the prescore controls in a JSON request body are refused, or None (no body, not
    JSON, no ``vllm_xargs`` dict: vLLM answers those itself; or valid controls)."""
    from prescore_backend.requests import parse_controls

    # Most requests: no second parse. Only a plain key can be absent from the bytes (an
    # escaped one, or a UTF-16/32 body, which json.loads also reads, is parsed).
    if b"vllm_xargs" not in body and b"\\u" not in body and b"\x00" not in body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    xargs = payload.get("vllm_xargs") if isinstance(payload, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        parse_controls(xargs)
    except (ValueError, OverflowError) as e:
        return str(e)
    return None


class RequestGuard:
    """Pure ASGI middleware: API key on every non-probe path, bounded request bodies, prescore
    controls checked before vLLM reads the request."""

    def __init__(self, app) -> None:
        self.app = app
        self._settings: tuple[list[bytes], int] | None = None

    def _load(self, scope) -> tuple[list[bytes], int]:
        """API-key digests and the body limit, read once from the app's parsed arguments."""
        if self._settings is None:
            args = getattr(getattr(scope.get("app"), "state", None), "args", None)
            keys = [k for k in (getattr(args, "api_key", None)
                                or [os.environ.get("VLLM_API_KEY")]) if k]
            limit = getattr(args, "max_request_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
            self._settings = ([hashlib.sha256(k.encode()).digest() for k in keys], int(limit))
        return self._settings

    @staticmethod
    def _authorized(scope, digests: list[bytes]) -> bool:
        value = ""
        for name, raw in scope.get("headers", ()):
            if name == b"authorization":
                value = raw.decode("latin-1")
                break
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        got = hashlib.sha256(token.encode()).digest()
        ok = False
        for d in digests:  # constant time over all keys
            ok |= secrets.compare_digest(got, d)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        digests, limit = self._load(scope)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if digests and path not in OPEN_PATHS and not self._authorized(scope, digests):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _send_error(send, 401, "Missing or invalid API key: send "
                              "'Authorization: Bearer <key>'.", "authentication_error",
                              headers=[(b"www-authenticate", b"Bearer")])
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        too_large = (f"Request body exceeds {limit} bytes (prescore-serve "
                     "--max-request-body-bytes).")
        for name, raw in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    announced = int(raw)
                except ValueError:
                    announced = -1
                if announced > limit:
                    await _send_error(send, 413, too_large, "invalid_request_error")
                    return
                break

        if scope.get("method") == "POST" and _is_json(scope):
            await self._checked(scope, receive, send, limit, too_large)
            return

        received = 0
        started = refused = False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now and tell the app the client is gone, so it stops reading.
                    refused = True
                    if not started:
                        await _send_error(send, 413, too_large, "invalid_request_error")
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:  # the 413 is the response; drop what the app sends after it
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not refused:
                raise

    async def _checked(self, scope, receive, send, limit: int, too_large: str) -> None:
        """A JSON POST: the body read whole (within the limit), its prescore controls checked,
        then handed to the app as one message."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone before its request was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, 413, too_large, "invalid_request_error")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        error = controls_error(body)
        if error is not None:
            await _send_error(send, 400, error, "BadRequestError")
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, as the app expects

        await self.app(scope, replay, send)


def _is_json(scope) -> bool:
    """Whether the app will read the body as JSON: FastAPI's rule (no content type, or a
    ``json`` / ``+json`` subtype)."""
    for name, raw in scope.get("headers", ()):
        if name == b"content-type":
            subtype = raw.split(b";")[0].strip().lower().rpartition(b"/")[2]
            return subtype == b"json" or subtype.endswith(b"+json")
    return True
