"""ASGI middleware of the public service: a request-size limit and one error-body shape. No BentoML import.

BentoML 1.4 has no request-size limit of its own; ``BodyLimit`` answers 413 to a body above ``max_bytes``,
before reading it when Content-Length says so, else as soon as the streamed bytes pass the limit.
BentoML 1.4 answers a 4xx exception raised by an API with the JSON ``[{"error": message}]``; ``ErrorBody``
makes that ``{"error": message}``, the shape every other error of this service has, and gives the same shape to the
plain-text 4xx answers of the routing and the static files (404 Not Found, 405 Method Not Allowed, 416).
"""
from __future__ import annotations

import json
from http.client import responses

DRAIN_LIMIT = 64 * 1024 * 1024  # an over-limit body up to this size is read (and dropped) so the client sees the 413


class BodyTooLarge(Exception):
    pass


def _json_response_messages(status: int, payload) -> list[dict]:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> dict:
        return {"error": f"request body too large: the limit is {self.max_bytes} bytes "
                         f"({self.max_bytes / 2**20:g} MiB); send smaller or fewer images"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, declared)
            for m in _json_response_messages(413, self._message()):
                await send(m)
            return

        seen, over, started = 0, False, False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge(self._message()["error"])
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # whatever the app answers to a cut-off body, the client gets the 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._drain(receive, DRAIN_LIMIT)
                    for m in _json_response_messages(413, self._message()):
                        await send(m)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
            await self._drain(receive, DRAIN_LIMIT)
            for m in _json_response_messages(413, self._message()):
                await send(m)

    @staticmethod
    async def _drain(receive, limit: int) -> None:
        """Read and drop the rest of the body (up to ``limit`` bytes) so that a client still uploading reads
        the answer instead of a reset connection; past ``limit`` the server just answers and closes."""
        if limit > DRAIN_LIMIT:
            return
        read = 0
        while read <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class ErrorBody:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message):
            nonlocal held
            if message["type"] == "http.response.start":
                if 400 <= message["status"] < 500:
                    held = message  # hold the 4xx answer until its body is complete
                    return
                return await send(message)
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = [(k, v) for k, v in held.get("headers") or [] if k.lower() != b"content-length"]
            if dict(headers).get(b"content-type", b"").startswith(b"application/json"):
                body = _unwrap(b"".join(chunks))
            else:  # Starlette's plain-text 404, 405, 416
                error = _plain_error(scope, held["status"], b"".join(chunks), dict(headers))
                body = json.dumps({"error": error}).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, rewriting_send)


def _plain_error(scope, status: int, body: bytes, headers: dict) -> str:
    """The message of a plain-text 4xx answer: its text (or the status's name), the request, the allowed methods."""
    text = body.decode("utf-8", "replace").strip() or responses.get(status, "Client Error")
    path = scope.get("path", "")
    path = path if len(path) <= 100 else path[:100] + "..."
    allowed = headers.get(b"allow")
    return f"{text}: {scope.get('method', '')} {path}" + (f" (allowed: {allowed.decode('latin-1')})" if allowed else "")


def _unwrap(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict) and "error" in payload[0]:
        return json.dumps(payload[0]).encode()
    return body
