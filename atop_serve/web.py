"""The web page at the service's root: try the defence in a browser, without writing code. No BentoML import.

Plain HTML, CSS and JavaScript in atop_serve/static (no framework, no build step, nothing fetched from the
internet); the page calls the public API like any client: /metadata, /inspect, /attack_demo. The service mounts
these routes with ``@bentoml.asgi_app`` (atop_serve/service.py):

    GET /              the page (static/index.html), under a strict Content-Security-Policy
    GET /static/...    its script and style sheet, and the bundled CIFAR-10 test images (static/samples)
    GET /samples       the bundled images: [{"name": "cat-0001", "label": "cat", "url": "/static/samples/cat-0001.png"}]
    GET /docs          BentoML's own API page (Swagger UI), which the page replaces at /
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
SAMPLES = STATIC / "samples"  # <class>-<index in the CIFAR-10 test class folder>.png, 32x32
# Everything from this server; images also as data: URLs (API answers) and blob: URLs (the user's own file).
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def samples() -> list[dict]:
    return [{"name": p.stem, "label": p.stem.rsplit("-", 1)[0], "url": f"/static/samples/{p.name}"}
            for p in sorted(SAMPLES.glob("*.png"))]


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                                        "X-Content-Type-Options": "nosniff"})


async def _samples(request: Request) -> Response:
    return JSONResponse(samples())


def _file(path: Path):
    async def endpoint(request: Request) -> Response:
        return FileResponse(path)

    return endpoint


def _bentoml_docs_page() -> Path | None:
    """BentoML 1.4's API page (served at / unless a mounted app takes /); None if this BentoML has no such file."""
    try:
        import _bentoml_impl.server as server
    except ImportError:
        return None
    page = Path(server.__file__).parent / "main-openapi.html"
    return page if page.is_file() else None


def routes() -> list:
    out = [Route("/", _index, methods=["GET", "HEAD"]), Route("/samples", _samples, methods=["GET"]),
           Mount("/static", StaticFiles(directory=STATIC), name="atop-static")]
    docs = _bentoml_docs_page()
    if docs is not None:
        out.append(Route("/docs", _file(docs), methods=["GET"]))
    return out
