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
    # boundaries starlette reads otherwise (with the quote), or a Content-Type the full path refuses (415)
    for content_type in ('multipart/form-data; boundary=b0"', 'multipart/form-data; boundary="b0',
                         "multipart/form-data; boundary=b0\x0b", " multipart/form-data; boundary=b0"):
        assert boundary_of(content_type) is None


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
    # part headers python-multipart refuses (the full path answers 400) or reads otherwise
    _body(IMG_PART.replace(b"Content-Disposition:", b"Content-Disposition :")),  # not a header name
    _body(IMG_PART.replace(b"\r\nContent-Type", b"\r\n\nContent-Type")),
    _body(IMG_PART.replace(b"image/png", b"image/png\r")),                  # a CR inside a header line
    _body(IMG_PART.replace(b'filename="a.png"', b'filename="a\rb.png"')),
    _body(IMG_PART.replace(b'"a.png"', b'"a.png"\x0c')),                    # the full path: filename '"a.png"\x0c'
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


def _call(app, body: bytes, headers: dict[bytes, bytes] | list, path="/classify", method="POST", chunk=1000):
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "path": path, "method": method,
             "headers": headers if isinstance(headers, list) else list(headers.items())}
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

    # two Content-Types: the first is the one the full path reads
    app, inner, outcomes = _app()
    twice = [(b"content-type", b"application/json"), *headers.items()]
    assert _call(app, body, twice)[0] == 299 and inner.bodies == [body] and outcomes == []

    # never read by the fast path: CORS requests, chunked or large bodies, other paths and methods
    for h, kw in (({**headers, b"origin": b"http://elsewhere"}, {}),
                  ({b"content-type": headers[b"content-type"], b"transfer-encoding": b"chunked"}, {}),
                  ({**headers, b"content-length": b"999999999"}, {}),
                  (headers, {"path": "/classify_batch"}), (headers, {"method": "PUT"})):
        app, inner, outcomes = _app()
        assert _call(app, body, h, **kw)[0] == 299 and inner.bodies == [body] and outcomes == []


# ------------------------------------------------------------------------- the contract, property-based (hypothesis)
# For any body, parse_classify_form either raises Fallback or returns exactly what the full path reads from it:
# ClassifyInput (atop_serve/forms.py) on starlette's form parsing with python-multipart, as BentoML calls it.
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from starlette.requests import Request  # noqa: E402

from atop_serve.forms import MAX_SEED, SETTINGS, ClassifyInput, Rejected  # noqa: E402


def full_path(body: bytes, content_type: bytes) -> ClassifyForm | Rejected:
    """What the API's input spec reads from a /classify request (the reference), or its 4xx."""
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def read():
        try:
            got = await ClassifyInput.from_http_request(Request(scope, receive), None)
        except Rejected as e:
            return e
        return ClassifyForm(got.image.data, got.image.filename, got.image.content_type, got.samples, got.seed)

    return asyncio.run(read())


def assert_fast_agrees(body: bytes, content_type: bytes) -> ClassifyForm | None:
    boundary = boundary_of(content_type.decode("latin-1"))
    if boundary is None:
        return None
    try:
        form = parse_classify_form(body, boundary, SETTINGS.max_samples, MAX_SEED)
    except Fallback:
        return None
    assert form == full_path(body, content_type)
    return form


_BOUNDARY_CHARS = "0123456789abcdefABCDEF'()+_,./:=?-"
_TEXT = st.text(st.sampled_from('aé.pngJPG_- ;="\\\r\n\t/%*\x00ü☃'), min_size=1, max_size=12)
_NUMBERS = st.one_of(st.integers(-3, 12).map(str), st.integers(0, 2**64).map(str), st.integers(1, 8).map(str),
                     st.sampled_from(["0", "04", " 3", "3 ", "3\n", "+3", "3.0", "1e1", "true", "null", '"3"', "", "٣"]),
                     _TEXT)
_BINARY = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"\r\n", b"\r", b"\n", b"--", b"\r\n--", b"\r\n\r\n", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"])), max_size=8).map(b"".join)


@st.composite
def _bodies(draw) -> tuple[bytes, bytes]:
    """(body, Content-Type): what clients send (httpx's encoder), then maybe mangled the ways bodies go wrong."""
    boundary = draw(st.text(st.sampled_from(_BOUNDARY_CHARS), min_size=1, max_size=20).map(str.strip)) or "b"
    data = draw(_BINARY)
    data = data.replace(b"\r\n--\x00", b"\r\n--" + boundary.encode())  # the boundary itself inside the file
    files = {"image": (draw(_TEXT), data, draw(st.sampled_from(["image/png", "image/jpeg", "", " x/y "])))}
    names = draw(st.sets(st.sampled_from(["samples", "seed"]))) | ({"other"} if draw(st.integers(0, 5)) == 0 else set())
    fields = {k: draw(_NUMBERS) for k in names}
    content_type = draw(st.sampled_from([
        f"multipart/form-data; boundary={boundary}", f'multipart/form-data; boundary="{boundary}"',
        f"Multipart/Form-Data;boundary={boundary} "] * 4 + [
        f"multipart/form-data; boundary={boundary}\"", f'multipart/form-data; boundary="{boundary}',
        f"multipart/form-data; boundary={boundary}; charset=latin-1", f"multipart/form-data; Boundary={boundary}"]))
    request = httpx.Request("POST", "http://x/classify", files=files, data=fields,
                            headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'})
    body = request.read()
    if draw(st.booleans()):  # the parts' order, case, quoting, spacing, extra params
        parts = body.split(b"--" + boundary.encode())
        middle = parts[1:-1]
        draw(st.randoms(use_true_random=False)).shuffle(middle)
        body = (b"--" + boundary.encode()).join([parts[0], *middle, parts[-1]])
    for _ in range(max(0, draw(st.integers(-3, 3)))):
        old, new = draw(st.sampled_from([
            (b"\r\n", b"\n"), (b"\r\n", b"\r\n\r\n"), (b"\r\n", b""), (b"\r\n", b"\r"), (b"\r\n", b"\r\n "),
            (b"Content-Disposition", b"content-disposition"), (b"Content-Disposition", b"CONTENT-DISPOSITION"),
            (b"Content-Disposition", b"Content-Disposition "), (b"Content-Disposition: ", b"Content-Disposition:"),
            (b"Content-Disposition: ", b"Content-Disposition:\t"), (b"Content-Type: ", b"Content-Type:  "),
            (b"Content-Type", b"\nContent-Type"), (b"form-data", b"FORM-DATA"), (b"form-data", b"attachment"),
            (b"form-data; ", b"form-data;"), (b"name=", b"NAME="), (b'name="image"', b"name=image"),
            (b'name="samples"', b'name="seed"'), (b'"\r\n', b'" \r\n'), (b'"\r\n', b'"\x0c\r\n'),
            (b'"\r\n', b'"; size=3\r\n'), (b'"\r\n', b'"\r\nContent-Transfer-Encoding: binary\r\n'),
            (b"; filename", b"; filename*=UTF-8''x; filename"), (b"image/png", b"image/png\r"),
            (b"\r\n\r\n", b"\r\n\r\n\r\n--" + boundary.encode()), (b"--\r\n", b"--"), (b"--\r\n", b"--\r\nepilogue"),
            (b"--" + boundary.encode() + b"\r\n", b"--" + boundary.encode() + b" \r\n"),
            (b"--" + boundary.encode() + b"\r\n", b"--" + boundary.encode()[:-1] + b"\r\n")]))
        at = draw(st.integers(0, max(0, body.count(old) - 1)))
        pieces = body.split(old)
        if len(pieces) > at + 1:
            body = old.join(pieces[:at + 1]) + new + old.join(pieces[at + 1:])
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    if cut is not None and draw(st.integers(0, 3)) == 0:
        body = body[:cut] if draw(st.booleans()) else body[:cut] + body[cut:][:draw(st.integers(0, 30))] * 2
    return body, content_type.encode("latin-1")


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_bodies())
def test_fast_parser_reads_what_the_full_path_reads_or_falls_back(case):
    assert_fast_agrees(*case)


def test_reads_the_values_the_full_path_reads():
    """Values the full path reads in its own way: the filename as UTF-8, the part's Content-Type as sent."""
    cases = [(IMG_PART.replace(b"a.png", "é.png".encode()), "é.png", "image/png"),
             (IMG_PART.replace(b"image/png", b"image/png "), "a.png", "image/png "),
             (IMG_PART.replace(b"Content-Type: ", b"Content-Type:\t"), "a.png", "\timage/png"),
             (IMG_PART.replace(b"Content-Type: ", b"Content-Type:"), "a.png", "image/png")]
    for part, filename, content_type in cases:
        form = assert_fast_agrees(_body(part), b"multipart/form-data; boundary=b0")
        assert form == ClassifyForm(IMAGE, filename, content_type, None, None)
    with pytest.raises(Fallback):  # a part header line over 4 KB: python-multipart refuses it (the full path: 400)
        parse(_body(IMG_PART.replace(b'"a.png"', b'"' + b"a" * 5000 + b'"')), b"b0")
