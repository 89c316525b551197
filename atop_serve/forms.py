"""The public endpoints' inputs: multipart forms, parsed and checked here so that every mistake gets a 4xx.

BentoML 1.4's own multipart parsing answers 500 to common client mistakes (a text value in a file field is
fetched as a URL; a file under an unknown field name is JSON-decoded), so these input specs read the form
themselves: unknown, repeated or missing fields, a text value where a file belongs and out-of-range values
each get a 400 (413: too many images) with a message naming the fix.
"""
from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path, PurePath
from typing import ClassVar, Optional

import bentoml
from bentoml.exceptions import BadInput
from pydantic import Field, StrictInt, ValidationError
from starlette.datastructures import UploadFile

from .engine import VIEWS, View
from . import settings

SETTINGS = settings.load()
MAX_SEED = 2**63 - 1
SHOWN_CHARS = 80  # the most of a client's value an error message quotes back (and the log line repeats)

# StrictInt: a form value is JSON-decoded first, so "3" is the integer 3, while true, 1.0, 1e0 or "1_0" are refused
# (lax validation read them as 1, 1, 1 and 10); the /classify fast path takes only plain decimals too
SamplesField = Field(None, ge=1, le=SETTINGS.max_samples, description=(
    f"K purifications averaged (1..{SETTINGS.max_samples}): steadier and more robust, K times the compute. "
    "Default: the model's recommended K (GET /metadata: serving.limits.default_samples)."))
SeedField = Field(None, ge=0, le=MAX_SEED,
                  description="Reproducible RT draws; refused (400) unless the server sets ATOP_ALLOW_SEED=1.")


class Rejected(BadInput):
    """A 4xx answer with the status given (BentoML maps only a few statuses to exception classes)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, error_code=HTTPStatus(status))


class Upload:
    """An uploaded file, in memory: what a file field of these input specs holds (``read_bytes()``, like a Path).

    BentoML 1.4 writes every file field to a temporary file in a per-request directory before the API sees it,
    0.3 ms of CPU a request here: more than decoding a 32x32 JPEG."""

    __slots__ = ("data", "filename", "content_type")

    def __init__(self, data: bytes, filename: str | None = None, content_type: str | None = None):
        self.data, self.filename, self.content_type = data, filename, content_type

    @classmethod
    async def read(cls, upload: UploadFile) -> "Upload":
        return cls(await upload.read(), upload.filename, upload.content_type)

    def read_bytes(self) -> bytes:
        return self.data


_NO_FILE = PurePath("upload")  # stands for an upload while the other fields are validated (no file is written)


class FormInput(bentoml.IODescriptor):
    """multipart/form-data: file fields must hold uploads; other fields a plain value (JSON or text)."""

    usage: ClassVar[str] = ""
    max_files: ClassVar[int] = 1

    @classmethod
    async def from_http_request(cls, request, serde):
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise Rejected(f"send the image as multipart/form-data; {cls.usage}", 415)
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001  (starlette raises several types for a malformed body)
            reason = getattr(e, "detail", None) or e
            raise Rejected(f"malformed multipart/form-data body: {reason}; {cls.usage}") from None
        data = {key: cls._field(key, form.getlist(key)) for key in dict.fromkeys(form.keys())}
        missing = [k for k in cls.multipart_fields if k not in data]
        if missing:
            raise Rejected(f"missing file field {missing[0]!r}; {cls.usage}")
        # the uploads stay in memory: validated as file fields (count, type) with a placeholder path, then put in
        files = {k: data[k] for k in cls.multipart_fields}
        placeholders = {k: [_NO_FILE] * len(v) if isinstance(v, list) else _NO_FILE for k, v in files.items()}
        try:
            checked = cls.model_validate({**data, **placeholders})
        except ValidationError as e:
            raise Rejected(f"{_describe(e)}; {cls.usage}") from None
        uploads = {k: [await Upload.read(f) for f in v] if isinstance(v, list) else await Upload.read(v)
                   for k, v in files.items()}
        return checked.model_copy(update=uploads)

    @classmethod
    def _field(cls, key: str, values: list):
        if key not in cls.model_fields:
            raise Rejected(f"unknown field {_shown(key)}; {cls.usage}")
        if key in cls.multipart_fields:
            if not all(isinstance(v, UploadFile) for v in values):
                raise Rejected(f"field {key!r} must be a file upload (curl: -F {key}=@photo.jpg), not a text value")
            if len(values) > cls.max_files:
                if cls.max_files == 1:
                    raise Rejected(f"send one file in {key!r} (use /classify_batch for several images)")
                raise Rejected(f"too many images: {len(values)} in one request; the limit is {cls.max_files}", 413)
            return values if cls.max_files > 1 else values[0]
        if len(values) > 1:
            raise Rejected(f"field {key!r} is given {len(values)} times; give it once")
        if isinstance(values[0], UploadFile):
            raise Rejected(f"field {key!r} takes a value, not a file")
        try:
            return json.loads(values[0])
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply (e.g. 100,000 "[")
            return values[0]


def _shown(value) -> str:
    """A client's value as an error message quotes it: its repr, cut to SHOWN_CHARS (a field can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "input"
        got = f" (got {_shown(err['input'])})" if isinstance(err.get("input"), (int, float, str)) else ""
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


class NoInput(bentoml.IODescriptor):
    """No fields, and the body is not parsed: POST /metadata. (BentoML's own parsing of a body an API does not use
    answers 500 to a form with a binary file or a deeply nested JSON value.)"""

    @classmethod
    async def from_http_request(cls, request, serde):
        return cls()


class ClassifyInput(FormInput):
    usage: ClassVar[str] = (f"fields: image (one file, required), samples (1..{SETTINGS.max_samples}, default: the "
                            "model's K), seed (int, only where the server allows it)")
    image: Path = Field(description="The image: PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF, any size.")
    samples: Optional[StrictInt] = SamplesField
    seed: Optional[StrictInt] = SeedField


class BatchInput(FormInput):
    usage: ClassVar[str] = (f"fields: images (1..{SETTINGS.max_images} files, repeat the field), samples "
                            f"(1..{SETTINGS.max_samples}, default: the model's K), seed (int, only where the server allows it)")
    max_files: ClassVar[int] = SETTINGS.max_images
    images: list[Path] = Field(min_length=1, description=f"1 to {SETTINGS.max_images} images, in order.")
    samples: Optional[StrictInt] = SamplesField
    seed: Optional[StrictInt] = SeedField


class PurifyInput(FormInput):
    usage: ClassVar[str] = (f"fields: image (one file, required), view ({', '.join(VIEWS)}; default purified), "
                            "seed (int, only where the server allows it)")
    image: Path = Field(description="The image: PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF, any size.")
    view: View = Field(
        "purified", description="purified: g(RT(x)); transformed: RT(x), the purifier's input; mask: RT's mask.")
    seed: Optional[StrictInt] = SeedField
