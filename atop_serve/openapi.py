"""The service's OpenAPI document, completed. No BentoML import.

BentoML 1.4 generates /docs.json (and the /docs page that reads it) from the API methods alone: every method is
listed with 200, 400, 404 and 500, whatever it really answers, and the GET routes of the mounted web app are left
out. ``complete`` adds what this service answers besides (413, 415, 422, 429 and 503, each with the ``{"error":
message}`` body of docs/service.md, "Errors") and its GET routes (/metadata, /model_card); ``CompleteSpec`` applies
it to /docs.json as it is served, so clients generated from the document know every status they can get.
"""
from __future__ import annotations

import json

from .imageio import FORMAT_NAMES

SPEC_PATH = "/docs.json"
ERROR_SCHEMA = "AtopError"
IMAGE_ENDPOINTS = ("/classify", "/classify_batch", "/purify", "/inspect", "/attack_demo")
IMAGE_ERRORS = {  # status: when (docs/service.md, "Errors")
    "413": "Too large: the request body (ATOP_MAX_REQUEST_BYTES), an image (ATOP_MAX_PIXELS), the images of one "
           "request in all (ATOP_MAX_REQUEST_PIXELS) or their number (ATOP_MAX_IMAGES).",
    "415": f"Not multipart/form-data, or a file that is not an image in an accepted format ({FORMAT_NAMES}).",
    "422": "An image in an accepted format, but truncated or damaged.",
    "503": "Overloaded: the request's rows waited longer than ATOP_MAX_LATENCY_MS for the model, or too many "
           "requests are in flight; retry after the Retry-After header's seconds.",
}
ATTACK_ERRORS = {
    "404": "The served model folder has no classifier.onnx: the attack demo is off (the message says why).",
    "429": "An attack is running and the queue of waiting ones is full; retry later.",
}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}}


def _openapi_30(node):
    """JSON Schema as BentoML 1.4 writes it -> the OpenAPI 3.0 dialect its document declares (in place): a file
    is ``{"type": "string", "format": "binary"}`` (not ``"type": "file"``), and an optional value is ``nullable``
    (3.0 has no ``"type": "null"``)."""
    if isinstance(node, list):
        for item in node:
            _openapi_30(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "file":
        node["type"], node["format"] = "string", "binary"
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node[key]
            if len(rest) == 1 and isinstance(rest[0], dict):
                node.update({k: v for k, v in rest[0].items() if k not in node})
            elif rest:
                node[key] = rest
            node["nullable"] = True
    for value in node.values():
        _openapi_30(value)


def complete(spec: dict) -> dict:
    """BentoML's generated document -> a valid OpenAPI 3.0 document with this service's other answers and GET
    routes (in place)."""
    _openapi_30(spec.get("components", {}))
    _openapi_30(spec.get("paths", {}))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas[ERROR_SCHEMA] = {"type": "object", "title": ERROR_SCHEMA, "required": ["error"],
                             "properties": {"error": {"type": "string", "title": "Message",
                                                      "description": "What is wrong and how to fix it."}},
                             "description": "Every error answer of the service."}
    paths = spec.setdefault("paths", {})
    for path in IMAGE_ENDPOINTS:
        post = paths.get(path, {}).get("post")
        if post is None:
            continue
        responses = post.setdefault("responses", {})
        for status, when in IMAGE_ERRORS.items():
            responses.setdefault(status, _error(when))
        if path == "/attack_demo":
            responses.update({status: _error(when) for status, when in ATTACK_ERRORS.items()})
        post["responses"] = dict(sorted(responses.items()))
    post_metadata = paths.get("/metadata", {}).get("post")
    if post_metadata is not None:
        answer = post_metadata.get("responses", {}).get("200", {"description": "Successful Response"})
        paths["/metadata"]["get"] = {"responses": {"200": answer}, "tags": post_metadata.get("tags", []),
                                     "description": post_metadata.get("description", ""),
                                     "operationId": f"{post_metadata.get('operationId', 'metadata')}__get"}
    paths.setdefault("/model_card", {})["get"] = {
        "responses": {"200": {"description": "The served model's card for people (MODEL_CARD.md), rendered from its "
                                             "card.json: what it is, every measured evaluation with its command.",
                              "content": {"text/markdown": {"schema": {"type": "string"}}}}},
        "tags": post_metadata.get("tags", []) if post_metadata else [],
        "description": "The model card of the served model, as Markdown.", "operationId": "atop__model_card"}
    return spec


class CompleteSpec:
    """ASGI middleware: GET /docs.json answers BentoML's document passed through ``complete``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != SPEC_PATH or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def completing_send(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 200:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                body = json.dumps(complete(json.loads(body))).encode()
            except (ValueError, AttributeError, TypeError):
                pass  # not the document expected: passed on as it is
            headers = [(k, v) for k, v in held.get("headers") or [] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, completing_send)
