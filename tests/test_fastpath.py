"""The /classify fast path (atop_serve/fastpath.py) in process: its strict form parser on what real clients send,
and its hand-off of everything else to the full path with the body intact. End to end (same answers as the full
path, the outcome counter): tests/test_service.py."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from atop_serve.fastpath import ClassifyForm, Fallback, FastClassify, boundary_of, parse_classify_form
from training.loadgen import Payload, multipart_body

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n"  # binary, CRLFs inside


def httpx_form(files, data=None) -> tuple[bytes, bytes]:
    """(body, boundary) exactly as httpx (and so BentoML's Python client) encodes a multipart form."""
    request = httpx.Request("POST", "http://x/classify", files=files, data=data)
    return request.read(), boundary_of(request.headers["content-type"])


def parse(body: bytes, boundary: bytes) -> ClassifyForm:
    return parse_classify_form(body, boundary, max_samples=8, max_seed=2**63 - 1)


def test_parses_what_clients_send():
    body, boundary = httpx_form({"image": ("cat.png", IMAGE, "image/png")}, {"samples": "3", "seed": "0"})
    form = parse(body, boundary)
    assert form == ClassifyForm(IMAGE, "cat.png", "image/png", 3, 0)

    body, boundary = httpx_form({"image": ("a.jpg", IMAGE)})  # no other field: the defaults stay the server's
    assert parse(body, boundary) == ClassifyForm(IMAGE, "a.jpg", "image/jpeg", None, None)

    # the project's load generator (training/loadgen.py), and a browser's boundary style, quoted
    body = multipart_body("0123abcd", Payload("x.jpg", IMAGE, label=3), samples=2)
    assert parse(body, b"0123abcd") == ClassifyForm(IMAGE, "x.jpg", "image/jpeg", 2, None)
    assert boundary_of('multipart/form-data; boundary="----WebKitFormBoundaryX1y2"') == b"----WebKitFormBoundaryX1y2"
    assert boundary_of("application/json") is None and boundary_of("multipart/form-data") is None


def _body(*parts: bytes, boundary: bytes = b"b0", end: bytes = b"--\r\n") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + end


IMG_PART = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + IMAGE


def _field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


@pytest.mark.parametrize("body", [
    _body(IMG_PART, IMG_PART),                                             # image twice (/classify takes one)
    _body(IMG_PART, _field("samples", b"2"), _field("samples", b"3")),     # a field repeated
    _body(IMG_PART, _field("other", b"1")),                                # an unknown field
    _body(_field("samples", b"2")),                                        # no image
    _body(_field("image", b"cat.jpg")),                                    # the image field as text
    _body(IMG_PART, _field("samples", b"0")),                              # samples out of range
    _body(IMG_PART, _field("samples", b"9")),
    _body(IMG_PART, _field("samples", b"04")),                             # not a plain number
    _body(IMG_PART, _field("samples", b" 4")),
    _body(IMG_PART, _field("samples", b"4.0")),
    _body(IMG_PART, _field("seed", b"-1")),
    _body(IMG_PART, _field("seed", b"99999999999999999999")),               # above the largest seed
    _body(IMG_PART.replace(b'filename="a.png"', b"filename*=UTF-8''a.png")),  # an encoded filename
    _body(IMG_PART.replace(b'name="image"', b'name="im\\"age"')),           # an escaped quote
    _body(b"Content-Transfer-Encoding: base64\r\n" + IMG_PART),             # another part header
    _body(IMG_PART.replace(b"image/png", b"image/png" + b"x" * 8000)),      # a header line the full path refuses
    _body(IMG_PART, end=b"\r\n"),                                          # no closing delimiter
    b"preamble\r\n" + _body(IMG_PART),                                     # a preamble
    _body(IMG_PART).replace(b"\r\n", b"\n"),                               # bare LF line ends
    b"garbage",
])
def test_anything_unusual_falls_back(body):
    with pytest.raises(Fallback):
        parse(body, b"b0")


# ---------------------------------------------------------------------------------------------- the middleware
class Inner:
    """The full path: records what it received."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            m = await receive()
            body, more = body + m.get("body", b""), m.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"full", "more_body": False})


def _call(app, body: bytes, headers: dict[bytes, bytes], path="/classify", method="POST", chunk=1000):
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "path": path, "method": method, "headers": list(headers.items())}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def _app(handler=None):
    outcomes: list[str] = []

    async def answer(form: ClassifyForm):
        return 200, [(b"content-type", b"application/json")], f'{{"n": {len(form.image)}}}'.encode()

    inner = Inner()
    return FastClassify(inner, "/classify", handler or answer, 8, 2**63 - 1, count=outcomes.append), inner, outcomes


def test_middleware_answers_plain_forms_and_hands_on_the_rest_intact():
    body, boundary = httpx_form({"image": ("a.png", IMAGE, "image/png")}, {"samples": "2"})
    headers = {b"content-type": b"multipart/form-data; boundary=" + boundary, b"content-length": str(len(body)).encode()}

    app, inner, outcomes = _app()
    status, hdrs, answer = _call(app, body, headers)
    assert (status, answer, outcomes, inner.bodies) == (200, f'{{"n": {len(IMAGE)}}}'.encode(), ["answered"], [])
    assert hdrs[b"content-length"] == str(len(answer)).encode()

    # a form it does not take: the full path gets the whole body, once
    bad, _ = httpx_form({"image": ("a.png", IMAGE, "image/png")}, {"samples": "0"})
    status, _, answer = _call(app, bad, {**headers, b"content-length": str(len(bad)).encode()})
    assert (status, answer, outcomes[-1], inner.bodies) == (299, b"full", "fallback", [bad])

    # the handler fails (a rejected image, an unexpected error): the full path answers
    async def failing(form):
        raise ValueError("not an image")

    app, inner, outcomes = _app(failing)
    assert _call(app, body, headers)[0] == 299 and inner.bodies == [body] and outcomes == ["fallback"]

    # never read by the fast path: CORS requests, chunked or large bodies, other paths and methods
    for h, kw in (({**headers, b"origin": b"http://elsewhere"}, {}),
                  ({b"content-type": headers[b"content-type"], b"transfer-encoding": b"chunked"}, {}),
                  ({**headers, b"content-length": b"999999999"}, {}),
                  (headers, {"path": "/classify_batch"}), (headers, {"method": "PUT"})):
        app, inner, outcomes = _app()
        assert _call(app, body, h, **kw)[0] == 299 and inner.bodies == [body] and outcomes == []
