"""The service end to end: a real ``bentoml serve`` subprocess (started once for the module) answering every
endpoint and every error case; plus, in process, the engine it runs (draws, seeds, fallback) and its settings.

The served model has random weights and the random transform switched off (rate 0, sigma 0), so the pipeline is
deterministic and the service's answers can be compared exactly with the offline ONNX graph's. The draws
themselves are tested in process on a model with the usual random transform.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from atop_serve import modelcard, modelio
from atop_serve.config import RTConfig, draw_rt_inputs_numpy
from atop_serve.engine import OnnxEngine, TorchEngine, load_engine, request_draws, row_seeds, sample_rows
from atop_serve.errors import AtopError, ModelError
from atop_serve.settings import Settings, model_tag

from tests._png import png_header_only, png_rgb
from tests._server import REPO, export_folder, png, serve
from tests.conftest import DATA_ROOT, make_model_folder, needs_data

SERVER_ENV = {  # small limits keep the error tests cheap
    "ATOP_MAX_REQUEST_BYTES": str(1024 * 1024), "ATOP_MAX_IMAGES": "8", "ATOP_MAX_SAMPLES": "4",
    "ATOP_ALLOW_SEED": "0", "ATOP_WORKERS": "2", "ATOP_ORT_THREADS": "1", "OMP_NUM_THREADS": "1",
    "ATOP_MAX_REQUEST_PIXELS": str(80_000_000),
}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def rt_folder(tmp_path_factory) -> Path:
    """A serving folder with the usual random transform (rt2)."""
    return export_folder(make_model_folder(tmp_path_factory.mktemp("serve") / "rt2", seed=1))


@pytest.fixture(scope="module")
def server(det_folder, tmp_path_factory):
    with serve(det_folder, SERVER_ENV, tmp_path_factory.mktemp("bentoml")) as running:
        yield running


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]


def offline_probs(folder: Path, pixels: np.ndarray) -> np.ndarray:
    """The exported graph run directly (no atop_serve engine code): uint8 (N, 32, 32, 3) -> probs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / modelio.ONNX_FILE), providers=["CPUExecutionProvider"])
    rt = RTConfig.from_dict(modelio.read_card(folder)["purifier"]["rt"])
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    draws = draw_rt_inputs_numpy(rt, len(x), 1)
    feed = {"images": x, **{i.name: draws[i.name] for i in session.get_inputs() if i.name != "images"}}
    return session.run(["probs"], feed)[0]


# ------------------------------------------------------------------------------------------ endpoints
def test_ready_quickly_with_health_and_metrics(server):
    assert server.startup_s < 30, f"ready after {server.startup_s:.1f} s"
    for path in ("/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "bentoml_service" in metrics.text
    log = server.log.read_text()
    assert "backend onnxruntime" in log and "CPUExecutionProvider" in log and str(Path("det")) in log


def test_classify(server, det_folder, images):
    r = server.post("/classify", files={"image": ("a.png", png(images[0]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    classes = modelio.read_card(det_folder)["classes"]
    assert set(body) == {"label", "class_id", "probabilities", "samples", "model"}
    assert body["label"] == classes[body["class_id"]] and list(body["probabilities"]) == classes
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["samples"] == 2 and body["model"] == "random-0"  # no samples field: the card's recommended K
    ref = offline_probs(det_folder, images[0][None])[0]
    assert body["class_id"] == int(ref.argmax())
    assert np.allclose(list(body["probabilities"].values()), ref, atol=1e-5)


def test_classify_samples(server, images):
    r = server.post("/classify", files={"image": ("a.png", png(images[0]))}, data={"samples": "4"})
    assert r.status_code == 200 and r.json()["samples"] == 4


@pytest.mark.parametrize("fmt,kw,mode", [("JPEG", {"quality": 90}, "RGB"), ("WEBP", {}, "RGBA"), ("GIF", {}, "P"),
                                         ("BMP", {}, "RGB"), ("TIFF", {}, "CMYK"), ("PNG", {}, "I;16")])
def test_classify_accepts_formats_and_modes(server, fmt, kw, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))  # not 32x32
    img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    r = server.post("/classify", files={"image": (f"x.{fmt.lower()}", encode(img, fmt, **kw))})
    assert r.status_code == 200, r.text


def test_classify_batch_keeps_order(server, images):
    files = [("images", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(images)]
    r = server.post("/classify_batch", files=files)
    assert r.status_code == 200, r.text
    batch = r.json()
    assert len(batch) == len(images)
    for p, answer in zip(images, batch):
        single = server.post("/classify", files={"image": ("x.png", png(p))}).json()
        assert answer["class_id"] == single["class_id"]
        assert np.allclose(list(answer["probabilities"].values()), list(single["probabilities"].values()), atol=1e-5)


def test_purify_views(server, images):
    for view in ("purified", "transformed", "mask"):
        data = {} if view == "purified" else {"view": view}
        r = server.post("/purify", files={"image": ("a.png", png(images[1]))}, data=data)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        out = np.asarray(Image.open(io.BytesIO(r.content)))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        if view == "transformed":  # the RT is off here: RT(x) = x
            assert np.array_equal(out, images[1])
        if view == "mask":  # 1 marks a missing pixel; none is missing at rate 0
            assert not out.any()


def test_metadata_get_and_post(server, det_folder):
    got = httpx.get(server.url + "/metadata")
    assert got.status_code == 200
    meta = got.json()
    card = modelio.read_card(det_folder)
    assert meta["classes"] == card["classes"] and meta["purifier"]["rt"] == card["purifier"]["rt"]
    serving = meta["serving"]
    assert serving["backend"] == "onnxruntime" and serving["providers"] == ["CPUExecutionProvider"]
    assert serving["graph"] == modelio.ONNX_FILE and serving["variant"] == "fp32" and "variant_not_served" not in serving
    assert {"atop_serve", "bentoml", "onnxruntime", "numpy", "pillow"} <= set(serving["versions"])
    assert serving["seed_allowed"] is False and serving["limits"]["max_images"] == 8
    assert serving["limits"]["default_samples"] == card["pipeline"]["samples"] == 2
    assert server.post("/metadata", json={}).json() == meta
    # the body of POST /metadata is ignored, whatever it holds (BentoML's parsing of it answered 500 to these)
    for kw in ({"files": {"x": ("a.png", b"\x89PNG\xff")}}, {"data": {"x": "[" * 5000 + "]" * 5000}},
               {"content": b"\xff" * 10, "headers": {"content-type": "application/json"}}):
        got = server.post("/metadata", **kw)
        assert got.status_code == 200 and got.json() == meta, got.text
    page = httpx.get(server.url + "/model_card")  # the same card, for people
    assert page.status_code == 200 and page.headers["content-type"] == "text/markdown; charset=utf-8"
    assert page.text == modelcard.render(card) and page.text.startswith(f"# {card['name']}\n")
    assert serving["limits"]["max_request_pixels"] == 80_000_000


def test_openapi_document_is_valid_and_complete(server):
    """/docs.json (what /docs shows and clients are generated from): valid OpenAPI 3.0 (BentoML's own document is
    not: "type": "file", "type": "null"), every status the image endpoints answer, the GET routes."""
    from openapi_spec_validator import validate

    spec = httpx.get(server.url + "/docs.json").json()
    validate(spec)
    paths = spec["paths"]
    for path in ("/classify", "/classify_batch", "/purify", "/inspect", "/attack_demo"):
        assert {"200", "400", "413", "415", "422", "503"} <= set(paths[path]["post"]["responses"]), path
    assert "429" in paths["/attack_demo"]["post"]["responses"]
    assert "get" in paths["/metadata"] and "text/markdown" in paths["/model_card"]["get"]["responses"]["200"]["content"]
    image = spec["components"]["schemas"]["ClassifyInput"]["properties"]["image"]
    assert (image["type"], image["format"]) == ("string", "binary")


def test_python_client(server, images, tmp_path):
    import bentoml

    path = tmp_path / "x.png"
    path.write_bytes(png(images[2]))
    with bentoml.SyncHTTPClient(server.url) as client:
        answer = client.classify(image=path, samples=2)
        assert answer["samples"] == 2 and answer["label"] in client.metadata()["classes"]
        assert [a["class_id"] for a in client.classify_batch(images=[path, path])] == [answer["class_id"]] * 2
        assert client.purify(image=path, view="transformed").size == (32, 32)


# ------------------------------------------------------------------------------------------ errors
def _chunked_upload():
    yield b'--bnd\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    for _ in range(3):
        yield b"\xff" * (512 * 1024)
    yield b"\r\n--bnd--\r\n"


GOOD = png(np.zeros((32, 32, 3), np.uint8))
JPEG = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG")
ERROR_CASES = {  # name: (path, request keywords, status, text the message holds)
    "empty file": ("/classify", {"files": {"image": ("a.png", b"")}}, 400, "empty"),
    "not an image": ("/classify", {"files": {"image": ("a.txt", b"hello, world")}}, 415, "not an image"),
    "truncated": ("/classify", {"files": {"image": ("a.jpg", JPEG[: len(JPEG) // 2])}}, 422, "truncated"),
    "png cut at a row's end": ("/classify", {"files": {"image": ("a.png", png_rgb(np.full((32, 32, 3), 9, np.uint8),
                                                                       keep_bytes=16 * 97))}}, 422, "ends early"),
    "too many bytes": ("/classify", {"files": {"image": ("a.png", b"\0" * (1024 * 1024 + 10))}}, 413, "too large"),
    "too many bytes streamed": ("/classify", {"content": _chunked_upload,
                                              "headers": {"content-type": "multipart/form-data; boundary=bnd"}},
                                413, "too large"),
    "too many pixels": ("/classify", {"files": {"image": ("a.png", png_header_only(10_000, 6_000))}}, 413, "MP"),
    "pillow bomb": ("/classify", {"files": {"image": ("a.png", png_header_only(20_000, 20_000))}}, 413, "pixels"),
    "too many images": ("/classify_batch", {"files": [("images", (f"{i}.png", GOOD)) for i in range(9)]}, 413,
                        "limit is 8"),
    "too many pixels in a request": ("/classify_batch", {"files": [("images", (f"{i}.png", png_header_only(6_000, 5_000)))
                                                                   for i in range(3)]}, 413, "90.0 MP in all"),
    "no images": ("/classify_batch", {"files": {"samples": (None, "1")}}, 400, "missing file field 'images'"),
    "one bad image in a batch": ("/classify_batch", {"files": [("images", ("a.png", GOOD)), ("images", ("b", b"??")),
                                                               ("images", ("c.png", GOOD))]}, 415, "image 2 of 3"),
    "samples 0": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "0"}}, 400, "samples"),
    "samples above max": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "5"}}, 400,
                          "less than or equal to 4"),
    "samples not a number": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "many"}}, 400,
                             "samples"),
    "samples true": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "true"}}, 400,
                     "valid integer"),
    "samples 1.0": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "1.0"}}, 400, "samples"),
    "samples 1_0": ("/inspect", {"files": {"image": ("a.png", GOOD)}, "data": {"samples": "1_0"}}, 400, "samples"),
    "seed 1e3": ("/purify", {"files": {"image": ("a.png", GOOD)}, "data": {"seed": "1e3"}}, 400, "seed"),
    "wrong field name": ("/classify", {"files": {"file": ("a.png", GOOD)}}, 400, "unknown field 'file'"),
    "text in file field": ("/classify", {"files": {"image": (None, "cat.jpg")}}, 400, "must be a file upload"),
    "two images to /classify": ("/classify", {"files": [("image", ("a.png", GOOD)), ("image", ("b.png", GOOD))]},
                                400, "classify_batch"),
    "seed while refused": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"seed": "7"}}, 400,
                           "ATOP_ALLOW_SEED"),
    "seed to /purify while refused": ("/purify", {"files": {"image": ("a.png", GOOD)}, "data": {"seed": "7"}}, 400,
                                      "seed"),
    "json body": ("/classify", {"json": {"image": "a.png"}}, 415, "multipart/form-data"),
    "malformed multipart": ("/classify", {"content": b"garbage",
                                          "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400,
                            "malformed"),
    "unknown view": ("/purify", {"files": {"image": ("a.png", GOOD)}, "data": {"view": "noise"}}, 400, "view"),
    "value nested too deeply": ("/classify", {"files": {"image": ("a.png", GOOD)},
                                              "data": {"samples": "[" * 50_000 + "]" * 50_000}}, 400, "samples"),
    "huge value quoted short": ("/inspect", {"files": {"image": ("a.png", GOOD)}, "data": {"seed": "x" * 200_000}},
                                400, "... (200002 characters)"),
    "long field name quoted short": ("/classify", {"files": {"image": ("a.png", GOOD)}, "data": {"f" * 500: "1"}},
                                     400, "... (502 characters)"),
    "garbage to /purify": ("/purify", {"files": {"image": ("a.gif", b"GIF89a" + b"\0" * 10)}}, 422, "GIF"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_clear_4xx(server, case):
    path, kw, status, text = ERROR_CASES[case]
    if callable(kw.get("content")):
        kw = {**kw, "content": kw["content"]()}
    r = server.post(path, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and text in body["error"] and len(body["error"]) < 1000, body


def test_routing_errors_are_json(server):
    """The 4xx answers of the routing and the static files have the JSON error shape of every other error."""
    for method, path, status, text in (("GET", "/classify", 405, "GET /classify (allowed: POST)"),
                                       ("PUT", "/metadata", 405, "Method Not Allowed"),
                                       ("GET", "/nothing-here", 404, "Not Found: GET /nothing-here"),
                                       ("GET", "/static/nothing-here.js", 404, "Not Found")):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
        assert set(r.json()) == {"error"} and text in r.json()["error"], r.text


def test_still_correct_after_bad_requests(server, det_folder, images):
    r = server.post("/classify", files={"image": ("a.png", png(images[0]))})
    assert r.status_code == 200
    ref = offline_probs(det_folder, images[0][None])[0]
    assert np.allclose(list(r.json()["probabilities"].values()), ref, atol=1e-5)
    assert httpx.get(server.url + "/readyz").status_code == 200


@needs_data()
def test_accuracy_equals_offline_graph(server, det_folder):
    """200 real test images (20 per class) sent as files, concurrently: service top-1 = offline graph top-1."""
    classes = sorted(p.name for p in (DATA_ROOT / "test").iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((DATA_ROOT / "test" / name).glob("*.jpg"))[:20]]
    labels = np.array([c for _, c in files])

    def ask(path: Path) -> int:
        r = server.post("/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        return r.json()["class_id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = np.array(list(pool.map(ask, [f for f, _ in files])))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    offline = offline_probs(det_folder, pixels).argmax(1)
    assert abs((served == labels).mean() - (offline == labels).mean()) <= 0.03
    assert (served == offline).mean() >= 0.95  # same function: only float rounding of near-ties may differ


@needs_data()
def test_eval_scores_the_running_service(server, det_folder, tmp_path):
    """`atop eval --url`: the service's answers for 8-bit images equal the eager pipeline's (RT off here), in
    chunks of the server's image limit; the report says the service scored it; other weights are refused."""
    import torch

    from training.evaluate import EvalConfig, ServiceScorer, evaluate

    card = modelio.read_card(det_folder)
    scorer = ServiceScorer(server.url, card, samples=2)
    assert scorer.max_images == 8
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (11, 3, 32, 32)).astype(np.float32) / 255)
    pipe = modelio.load_pipeline(det_folder, samples=2)
    from atop_serve.transforms import draw_rt_inputs

    with torch.no_grad():  # RT is off in this folder: any draws give the same answer
        eager = pipe.run(x, draw_rt_inputs(pipe.transform, len(x), 2, torch.Generator().manual_seed(0)))["probs"]
    assert torch.allclose(scorer(x), eager, atol=1e-5)
    report = evaluate(det_folder, EvalConfig(attacks=("clean", "fgsm"), n=20, batch_size=10, url=server.url,
                                              data=str(DATA_ROOT)), show_progress=False, out=tmp_path / "r")
    assert report["fingerprint"]["service"]["backend"] == "onnxruntime" and report["samples"] == 2
    assert all(0 <= r["accuracy"] <= 1 for r in report["results"].values())
    assert f"the running service at {server.url}" in (tmp_path / "r" / "report.md").read_text()
    other = {**card, "purifier": {**card["purifier"], "sha256": "0" * 64}}
    with pytest.raises(AtopError, match="other purifier weights"):
        ServiceScorer(server.url, other, samples=2)
    with pytest.raises(AtopError, match="at most 4"):
        ServiceScorer(server.url, card, samples=5)
    with pytest.raises(AtopError, match="no atop service"):
        ServiceScorer("http://127.0.0.1:9", card, samples=2)
    scorer.url = "http://127.0.0.1:9"  # the server goes away mid-run: a clear error, not a traceback
    with pytest.raises(AtopError, match="/classify_batch failed"):
        scorer(x[:1])


def _fast_path_counts(server) -> dict[str, float]:
    counts = {"answered": 0.0, "fallback": 0.0}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        for outcome in counts:
            if line.startswith(f'atop_fast_path_requests_total{{outcome="{outcome}"}}'):
                counts[outcome] += float(line.split()[-1])
    return counts


def test_fast_path_answers_as_the_full_path(server, images):
    """A plain /classify form is answered by the fast path (atop_serve/fastpath.py) with what BentoML's API layer
    answers (reached here by a chunked upload, which the fast path never reads); a form it does not take is handed
    on and gets the API's error; /metrics counts both outcomes."""
    request = httpx.Request("POST", server.url + "/classify", files={"image": ("a.png", png(images[2]), "image/png")},
                            data={"samples": "3"})
    body, headers = request.read(), {"content-type": request.headers["content-type"]}
    before = _fast_path_counts(server)
    fast = server.post("/classify", content=body, headers=headers)
    full = server.post("/classify", content=iter([body]), headers=headers)  # no length: chunked, the full path
    assert fast.status_code == full.status_code == 200, (fast.text, full.text)
    assert fast.json() == full.json() and fast.json()["samples"] == 3
    assert fast.headers["content-type"] == full.headers["content-type"] == "application/json"
    bad = server.post("/classify", files={"image": ("a.png", GOOD)}, data={"samples": "0"})
    assert bad.status_code == 400 and "samples" in bad.json()["error"]
    after = _fast_path_counts(server)
    assert after["answered"] - before["answered"] == 1 and after["fallback"] - before["fallback"] == 1, (before, after)


def test_server_never_crashed(server):
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("Service atop initialized") == 2 and "2 worker(s) x 1 thread(s)" in log  # ATOP_WORKERS=2


def test_requests_skip_unconfigured_tracing(server, images):
    """BentoML's tracing is not configured here, so requests skip its middleware: access log lines carry no trace
    ids (test_overload_is_503_with_the_reason runs a server with ATOP_TRACING=on, whose lines do)."""
    assert server.post("/classify", files={"image": ("a.png", png(images[1]), "image/png")}).status_code == 200
    lines: list[str] = []
    for _ in range(50):  # the access log line may reach the file a moment after the answer
        lines = [line for line in server.log.read_text().splitlines() if "path=/classify," in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines and not any("trace=" in line for line in lines), lines[:2]


def test_overload_is_503_with_the_reason(det_folder, tmp_path):
    """Rows still queued after ATOP_MAX_LATENCY_MS are not run: 503 with the reason and Retry-After, never a 500;
    the server goes on answering."""
    env = {**SERVER_ENV, "ATOP_WORKERS": "1", "ATOP_MAX_LATENCY_MS": "1", "ATOP_MAX_BATCH_SIZE": "2",
           "ATOP_TRACING": "on"}
    body = png(np.full((32, 32, 3), 128, np.uint8))
    with serve(det_folder, env, tmp_path) as running:
        def ask(_):
            return running.post("/classify", files={"image": ("a.png", body)}, data={"samples": "4"})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(48)))
        statuses = {r.status_code for r in answers}
        assert statuses <= {200, 503} and 503 in statuses, statuses
        busy = next(r for r in answers if r.status_code == 503)
        assert "overloaded" in busy.json()["error"] and busy.headers["retry-after"] == "1"
        assert ask(0).status_code in (200, 503) and httpx.get(running.url + "/readyz").status_code == 200
        log = running.log.read_text()
        assert "Traceback" not in log
        # ATOP_TRACING=on: requests pass through BentoML's tracing middleware (unsampled here: ids, no export)
        assert all("trace=" in line for line in log.splitlines() if "path=/classify," in line)


# ------------------------------------------------------------------------------------------ in process: engine
@pytest.mark.parametrize("mirror", [False, True])
def test_engine_rows_equal_graph_for_a_seed(rt_folder, mirror):
    """The service's rows (one K = 1 call per sample) give what the graph gives for (N=1, K) with the request's
    draws, mirrored samples included: the engine flips the odd-numbered samples' rows when the card says so. The
    mirrored case runs the shipped model's fp32 graph (its card sets pipeline.mirror): trained weights, whose
    answers for an image and its mirror differ by far more than the tolerance (random weights give near-uniform
    probabilities that hide a missing flip)."""
    folder, graph = (modelio.resolve("default"), "fp32") if mirror else (rt_folder, "auto")
    engine = load_engine(folder, threads=1, graph=graph)
    assert isinstance(engine, OnnxEngine) and engine.rt.kind == "rt2" and engine.mirror is mirror
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = engine.classify(pixels, samples=3, seeds=[5, 6, 7])
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    for i, seed in enumerate([5, 6, 7]):  # the graph fed (N=1, K=3) with the request's draws
        draws = request_draws(engine.rt, seed, 3)
        feed = {"images": x[i : i + 1], **{n: draws[n] for n in engine.input_names if n != "images"}}
        assert np.abs(engine.session.run(["probs"], feed)[0][0] - probs[i]).max() < 1e-5


def test_sample_rows_mirror_the_odd_samples():
    images = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    rows = sample_rows(images, 4, mirror=True)
    assert rows.shape == (8, 2, 3, 3)
    for r in range(8):
        image = images[r // 4]
        assert np.array_equal(rows[r], image[:, ::-1] if r % 4 % 2 else image)
    assert np.array_equal(sample_rows(images, 3), np.repeat(images, 3, axis=0))
    assert np.array_equal(sample_rows(images, 1, mirror=True), images)


def test_draws_are_fresh_unless_seeded(rt_folder):
    assert row_seeds(None, 4) != row_seeds(None, 4)
    assert row_seeds(7, 4) == row_seeds(7, 4) and len(set(row_seeds(7, 4))) == 4
    engine = load_engine(rt_folder, threads=1)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert not np.array_equal(engine.classify(pixels), engine.classify(pixels))
    assert np.array_equal(engine.classify(pixels, seeds=[1, 2]), engine.classify(pixels, seeds=[1, 2]))
    _, pictures = engine.predict_rows(pixels, row_seeds(None, 2), ["mask", "mask"])
    assert not np.array_equal(pictures[0], pictures[1])  # two requests, two masks


def test_torch_fallback_when_no_graph(rt_folder, tmp_path):
    no_graph = shutil.copytree(rt_folder, tmp_path / "eager", ignore=shutil.ignore_patterns(modelio.ONNX_FILE))
    eager = load_engine(no_graph, threads=1)
    assert isinstance(eager, TorchEngine) and eager.describe()["backend"] == "pytorch"
    onnx = load_engine(rt_folder, threads=1)
    pixels = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.abs(eager.classify(pixels, 2, [3, 4, 5, 6]) - onnx.classify(pixels, 2, [3, 4, 5, 6])).max() < 1e-4


def test_graph_choice_prefers_the_shipped_cpu_variant(rt_folder, tmp_path):
    """ATOP_GRAPH=auto runs pipeline.opt.onnx only where the card ships it (here a copy of the fp32 graph stands in
    for the variant), fp32 always runs pipeline.onnx, opt without a shipped variant is refused."""
    from atop_serve.engine import choose_graph

    folder = shutil.copytree(rt_folder, tmp_path / "variant")
    with pytest.raises(ModelError, match="ships no faster CPU variant"):
        load_engine(folder, threads=1, graph="opt")
    shutil.copy(folder / modelio.ONNX_FILE, folder / modelio.OPT_ONNX_FILE)
    assert load_engine(folder, threads=1).file == modelio.ONNX_FILE  # the file alone is not enough
    card = modelio.read_card(folder)
    card.setdefault("export", {})["cpu_variant"] = {"shipped": "int8", "weight_bits": 7}
    modelio.write_card(folder, card)
    engine = load_engine(folder, threads=1, providers=("CPUExecutionProvider",))
    assert engine.file == modelio.OPT_ONNX_FILE and engine.describe()["variant"] == "int8"
    assert load_engine(folder, threads=1, graph="fp32").file == modelio.ONNX_FILE
    card = modelio.read_card(folder)
    assert choose_graph(folder, card, "auto", ("CPUExecutionProvider",)) == modelio.OPT_ONNX_FILE
    with pytest.raises(AtopError, match="ATOP_GRAPH"):
        Settings.from_env({"ATOP_GRAPH": "int4"})


def test_int8_variant_with_8bit_weights_is_not_served_where_it_saturates(rt_folder, tmp_path, monkeypatch, caplog):
    """A card whose int8 variant has 8-bit weights (exported before 7-bit weights; no ``weight_bits``) runs the fp32
    graph on an x86 CPU without VNNI, with a warning and a note in describe(); on a CPU with VNNI, or with 7-bit
    weights, the variant runs; ATOP_GRAPH=opt forces it (warning)."""
    from atop_serve import cpu, engine as engine_mod

    folder = shutil.copytree(rt_folder, tmp_path / "legacy")
    shutil.copy(folder / modelio.ONNX_FILE, folder / modelio.OPT_ONNX_FILE)
    card = modelio.read_card(folder)
    card.setdefault("export", {})["cpu_variant"] = {"shipped": "int8-full-gate"}
    modelio.write_card(folder, card)
    cpu_cases = {"skylake": {"avx2", "avx512f", "avx512bw"}, "cascade-lake": {"avx2", "avx512f", "avx512_vnni"}}
    monkeypatch.setattr(engine_mod, "int8_saturates", lambda: cpu.int8_saturates("x86_64", cpu_cases["skylake"]))
    cpu_only = ("CPUExecutionProvider",)
    with caplog.at_level("WARNING", logger="atop_serve.engine"):
        served = load_engine(folder, threads=1, providers=cpu_only)
    assert served.file == modelio.ONNX_FILE and "no VNNI" in served.describe()["variant_not_served"]
    assert "instead of pipeline.opt.onnx" in caplog.text
    assert load_engine(folder, threads=1, providers=cpu_only, graph="opt").file == modelio.OPT_ONNX_FILE
    card["export"]["cpu_variant"]["weight_bits"] = 7
    modelio.write_card(folder, card)
    assert load_engine(folder, threads=1, providers=cpu_only).file == modelio.OPT_ONNX_FILE
    del card["export"]["cpu_variant"]["weight_bits"]
    modelio.write_card(folder, card)
    monkeypatch.setattr(engine_mod, "int8_saturates", lambda: cpu.int8_saturates("x86_64", cpu_cases["cascade-lake"]))
    served = load_engine(folder, threads=1, providers=cpu_only)
    assert served.file == modelio.OPT_ONNX_FILE and "variant_not_served" not in served.describe()


def test_cpu_int8_saturation_check(tmp_path):
    """x86 without VNNI saturates, with any VNNI flavour not; other architectures never; unreadable flags on x86:
    assume it does. The flags come from /proc/cpuinfo's first flags line."""
    from atop_serve import cpu

    assert cpu.int8_saturates("x86_64", {"avx2", "fma", "avx512f", "avx512bw"})
    assert cpu.int8_saturates("AMD64", set())
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not cpu.int8_saturates("x86_64", {"avx2", vnni})
    assert not cpu.int8_saturates("aarch64", set())
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    flags = cpu.cpu_flags()
    assert flags is None or isinstance(flags, frozenset)


def test_engine_refuses_unservable_folders(rt_folder, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_engine(tmp_path / "nowhere")
    clf_only = shutil.copytree(rt_folder, tmp_path / "clf")
    card = modelio.read_card(clf_only)
    del card["purifier"]
    modelio.write_card(clf_only, card)
    with pytest.raises(ModelError, match="no purifier"):
        load_engine(clf_only)
    broken = shutil.copytree(rt_folder, tmp_path / "broken")
    (broken / modelio.ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="cannot load"):
        load_engine(broken)
    with pytest.raises(ModelError, match="unavailable providers"):
        load_engine(rt_folder, providers=("NoSuchExecutionProvider",))


def test_serving_needs_no_torch(det_folder, tmp_path):
    """The service module and the ONNX engine import and run with torch unimportable; without the graph and
    without torch the engine refuses with a clear message."""
    no_graph = shutil.copytree(det_folder, tmp_path / "nograph", ignore=shutil.ignore_patterns(modelio.ONNX_FILE))
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "import atop_serve.service\n"
        "from atop_serve.engine import load_engine\n"
        "from atop_serve.errors import ModelError\n"
        "print(load_engine(sys.argv[1], threads=1).backend)\n"
        "try:\n"
        "    load_engine(sys.argv[2])\n"
        "except ModelError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "ATOP_MODEL": str(det_folder), "BENTOML_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script, str(det_folder), str(no_graph)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, refusal = out.stdout.strip().splitlines()
    assert backend == "onnxruntime" and "atop export" in refusal and "torch" in refusal


# ------------------------------------------------------------------------------------------ in process: settings
def test_settings_from_env():
    s = Settings.from_env({})
    assert (s.model, s.allow_seed, s.max_batch_size, s.max_latency_ms) == ("", False, 128, 2100)
    assert 1 <= s.serving_workers() <= 4 and s.threads_per_worker() >= 1 and s.access_log
    s = Settings.from_env({"ATOP_WORKERS": "3", "ATOP_ORT_THREADS": "2", "ATOP_ACCESS_LOG": "0"})
    assert (s.serving_workers(), s.threads_per_worker(), s.access_log) == (3, 2, False)
    s = Settings.from_env({"ATOP_ALLOW_SEED": "1", "ATOP_MAX_SAMPLES": "16", "ATOP_PROVIDERS": "CPUExecutionProvider"})
    assert s.allow_seed and s.max_samples == 16 and s.providers == ("CPUExecutionProvider",)
    assert Settings.from_env({"ATOP_DEFAULT_SAMPLES": "3"}).default_samples == 3
    for bad in ({"ATOP_MAX_SAMPLES": "lots"}, {"ATOP_ALLOW_SEED": "maybe"}, {"ATOP_MAX_IMAGES": "0"},
                {"ATOP_DEFAULT_SAMPLES": "9"}, {"ATOP_DEFAULT_SAMPLES": "-1"}, {"ATOP_WORKERS": "-1"},
                {"ATOP_MAX_REQUEST_PIXELS": "49999999"}, {"ATOP_MAX_PIXELS": "300000000"}):  # budget < one image
        with pytest.raises(AtopError, match="ATOP_"):
            Settings.from_env(bad)
    assert Settings.from_env({"ATOP_MAX_PIXELS": "1000", "ATOP_MAX_REQUEST_PIXELS": "1000"}).max_request_pixels == 1000


def test_tracing_setting(tmp_path):
    assert Settings.from_env({}).tracing == "auto"
    auto = Settings.from_env({})
    assert not auto.tracing_enabled({}) and not auto.tracing_enabled({"BENTOML_CONFIG_OPTIONS": "api_server.workers=2"})
    assert auto.tracing_enabled({"BENTOML_CONFIG_OPTIONS": "tracing.exporter_type=otlp tracing.sample_rate=1.0"})
    plain, traced = tmp_path / "plain.yaml", tmp_path / "traced.yaml"
    plain.write_text("version: 2\nservices:\n  atop:\n    workers: 2\n")
    traced.write_text("version: 2\nservices:\n  atop:\n    tracing:\n      exporter_type: zipkin\n")
    assert not auto.tracing_enabled({"BENTOML_CONFIG": str(plain)})
    assert auto.tracing_enabled({"BENTOML_CONFIG": str(traced)})
    assert auto.tracing_enabled({"BENTOML_CONFIG": str(tmp_path / "missing.yaml")})  # BentoML reports that one
    assert Settings.from_env({"ATOP_TRACING": "on"}).tracing_enabled({})
    assert not Settings.from_env({"ATOP_TRACING": "off"}).tracing_enabled({"BENTOML_CONFIG": str(traced)})
    with pytest.raises(AtopError, match="ATOP_TRACING='sometimes': valid: auto, on, off"):
        Settings.from_env({"ATOP_TRACING": "sometimes"})


def test_model_spec_tag_or_folder(tmp_path):
    assert model_tag("atop-default:latest") == "atop-default:latest" and model_tag("atop-default") == "atop-default"
    assert model_tag("") is None and model_tag(str(tmp_path)) is None and model_tag("some/folder") is None


def test_model_from_bentoml_store(det_folder, tmp_path):
    """ATOP_MODEL=<tag>: a BentoML store model whose directory is a serving folder."""
    script = (
        "import shutil, sys, bentoml\n"
        "from atop_serve.settings import resolve_model\n"
        "with bentoml.models.create('atop-test') as ref:\n"
        "    shutil.copytree(sys.argv[1], ref.path, dirs_exist_ok=True)\n"
        "folder, tag = resolve_model('atop-test:latest')\n"
        "print(folder / 'card.json', tag)\n"
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", script, str(det_folder)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    card_path, tag = out.stdout.split()
    assert json.loads(Path(card_path).read_text())["name"] == "random-0" and tag.startswith("atop-test:")


def _decoding_worker():
    """A stand-in for a service worker with only what decoding needs: the service's own decoding methods."""
    import functools
    import types

    from atop_serve import service

    worker = types.SimpleNamespace(_decoding=None, size=32)
    for name in ("_decode", "_decode_all", "_open", "_pixels"):
        setattr(worker, name, functools.partial(getattr(service.AtopService.inner, name), worker))
    return worker


def test_large_files_are_opened_off_the_event_loop(monkeypatch):
    """A file above INLINE_DECODE_BYTES is opened (its header read) in a decoding thread, not on the event loop: a
    32x32 PNG with hundreds of thousands of empty chunks takes seconds to open and would stall the whole worker."""
    import asyncio
    import threading

    from atop_serve import service
    from atop_serve.forms import Upload

    opened_in, open_image = [], service.open_image
    monkeypatch.setattr(service, "open_image", lambda data: opened_in.append(threading.get_ident()) or open_image(data))
    small = png(np.zeros((32, 32, 3), np.uint8))
    chunk = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))  # an empty ancillary chunk
    large = small[:33] + chunk * 10_000 + small[33:]  # 32x32, 120 KB: chunks after IHDR
    worker = _decoding_worker()

    async def decode_both():
        return [await worker._decode(Upload(data)) for data in (small, large)]

    assert asyncio.run(decode_both()) == [bytes(32 * 32 * 3)] * 2
    assert opened_in[0] == threading.get_ident() != opened_in[1]


def test_request_pixel_budget_is_checked_before_any_decoding(monkeypatch):
    """ATOP_MAX_REQUEST_PIXELS: a /classify_batch whose images decode to more pixels in all is refused (413) after
    reading headers only, naming the total and the limit; within it every image decodes, in order."""
    import asyncio
    import dataclasses

    from atop_serve import service
    from atop_serve.forms import Rejected, Upload

    monkeypatch.setattr(service, "SETTINGS", dataclasses.replace(service.SETTINGS, max_pixels=2_000_000,
                                                                 max_request_pixels=5_000_000))
    decoded, to_pixels = [], service.to_pixels
    monkeypatch.setattr(service, "to_pixels", lambda img, *a: decoded.append(img.size) or to_pixels(img, *a))
    worker = _decoding_worker()
    big = Upload(png(np.zeros((1000, 2000, 3), np.uint8)))  # 2 MP, a few KB

    def run(uploads):
        return asyncio.run(worker._decode_all(uploads, [f"image {i + 1}: " for i in range(len(uploads))]))
    with pytest.raises(Rejected) as e:
        run([big, big, big])  # 6 MP > 5 MP
    assert e.value.error_code == 413 and "6.0 MP in all" in str(e.value) and "5 MP per request" in str(e.value)
    assert decoded == []  # refused from the headers
    small = Upload(png(np.full((32, 32, 3), 7, np.uint8)))
    assert run([big, small, big]) == [bytes(32 * 32 * 3), bytes([7]) * (32 * 32 * 3), bytes(32 * 32 * 3)]
    with pytest.raises(Rejected, match="image 2: the file is not an image"):
        run([big, Upload(b"??"), big])
