"""The common ``/classify`` request answered without BentoML's API layer. No BentoML import.

A ``POST /classify`` with one small multipart form (an ``image`` file, optional ``samples`` and ``seed`` given as
plain decimal numbers) is the request this service gets most, and on a 2-core CPU BentoML's per-request layers
around it (routing, request context, the input spec's form parsing with python-multipart and pydantic, the
response's schema-driven serialisation) cost about as much CPU as the rest of the web stack (docs/benchmarks.md).
``FastClassify`` (ASGI middleware, innermost of the service's own) parses exactly that form with a strict parser
and hands it to the same handler code the API runs; BentoML's outer middleware (metrics, access log, traffic
limits) still sees every request. Anything else, or anything it is not sure of (another field, a repeated one, a
value that is not a plain number in range, a chunked or large body, an ``Origin`` header for CORS, an image the
decoder rejects, any unexpected error), goes through the full BentoML path with the body replayed, so that every
error answer and every unusual request has one implementation: the API's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Awaitable, Callable

FAST_MAX_BYTES = 256 * 1024  # larger bodies (photos) take the full path, where decoding runs in a thread
_DISPOSITION = re.compile(rb'^form-data; name="([A-Za-z_]+)"(?:; filename="([^"\\]*)")?$', re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary="?([0-9A-Za-z\'()+_,./:=?-]{1,70})"?$')
_NUMBER = re.compile(rb"^(0|[1-9][0-9]{0,18})$")
MAX_HEADER_LINE = 4096  # a longer part header line: the full path decides (python-multipart refuses above 4 KiB + 128)


class Fallback(Exception):
    """The request is not the simple case: answer it through the full path."""


@dataclass(frozen=True)
class ClassifyForm:
    image: bytes
    filename: str
    content_type: str | None
    samples: int | None
    seed: int | None


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type (None for anything else)."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        return None
    m = _BOUNDARY.match(params.strip())
    return m.group(1).encode() if m else None


def parse_classify_form(body: bytes, boundary: bytes, max_samples: int, max_seed: int) -> ClassifyForm:
    """The fields of a /classify form, or ``Fallback`` unless it is exactly: one ``image`` file part and at most one
    ``samples`` (1..max_samples) and one ``seed`` (0..max_seed) part holding a plain decimal number."""
    delimiter = b"\r\n--" + boundary
    parts = (b"\r\n" + body).split(delimiter)
    if len(parts) < 3 or parts[0] or parts[-1] not in (b"--", b"--\r\n"):
        raise Fallback("not a plain multipart body")
    fields: dict[str, tuple[bytes, str | None, str | None]] = {}
    for part in parts[1:-1]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not head.startswith(b"\r\n") or not sep:
            raise Fallback("malformed part")
        disposition, content_type = None, None
        for line in head[2:].split(b"\r\n"):
            if len(line) > MAX_HEADER_LINE:
                raise Fallback("long part header")
            key, colon, val = line.partition(b":")
            key = key.strip().lower()
            if not colon:
                raise Fallback("malformed part header")
            if key == b"content-disposition" and disposition is None:
                disposition = _DISPOSITION.match(val.strip())
                if disposition is None:
                    raise Fallback("unusual Content-Disposition")
            elif key == b"content-type" and content_type is None:
                content_type = val.strip().decode("latin-1")
            else:
                raise Fallback("unusual part header")
        if disposition is None:
            raise Fallback("part without a name")
        name = disposition.group(1).decode()
        filename = disposition.group(2)
        if name in fields:
            raise Fallback(f"field {name} repeated")
        fields[name] = (value, None if filename is None else filename.decode("latin-1"), content_type)
    if "image" not in fields or fields["image"][1] is None or set(fields) - {"image", "samples", "seed"}:
        raise Fallback("not the /classify fields")
    numbers = {}
    for name, top in (("samples", max_samples), ("seed", max_seed)):
        if name not in fields:
            numbers[name] = None
            continue
        value, filename, _ = fields[name]
        if filename is not None or not _NUMBER.match(value) or not (name == "seed" or int(value) >= 1) \
                or int(value) > top:
            raise Fallback(f"{name} is not a plain number in range")
        numbers[name] = int(value)
    data, filename, content_type = fields["image"]
    return ClassifyForm(data, filename, content_type, numbers["samples"], numbers["seed"])


Handler = Callable[[ClassifyForm], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]


class FastClassify:
    """ASGI middleware: answer ``POST <path>`` bodies that ``parse_classify_form`` accepts with ``await
    handler(form)`` -> (status, headers, body). Where parsing or the handler raises (``Fallback``, a rejected
    image, anything), the full path answers the request instead, with the body replayed: the same error again
    then gets the API's answer and log line. ``count(outcome)`` (optional) is told "answered" or "fallback" for
    every request the fast path read."""

    def __init__(self, app, path: str, handler: Handler, max_samples: int, max_seed: int,
                 max_bytes: int = FAST_MAX_BYTES, count: Callable[[str], None] | None = None):
        self.app, self.path, self.handler, self.count = app, path, handler, count or (lambda outcome: None)
        self.max_samples, self.max_seed, self.max_bytes = max_samples, max_seed, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        boundary, length = None, None
        for key, value in scope["headers"]:
            if key == b"content-type":
                boundary = boundary_of(value.decode("latin-1"))
            elif key == b"content-length":
                length = int(value) if value.isdigit() else None
            elif key == b"origin" or key == b"transfer-encoding":
                return await self.app(scope, receive, send)  # CORS, chunked uploads: the full path
        if boundary is None or length is None or length > self.max_bytes:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            form = parse_classify_form(body, boundary, self.max_samples, self.max_seed)
            status, headers, answer = await self.handler(form)
        except Exception:  # noqa: BLE001  (Fallback, a rejected image, anything: the API answers it)
            self.count("fallback")
            return await self.app(scope, _replay(body, receive), send)
        self.count("answered")
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer, "more_body": False})


def _replay(body: bytes, receive):
    """A ``receive`` that yields the already read body once, then defers to the client's."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
