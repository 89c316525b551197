"""The web page and what it calls, on a real ``bentoml serve`` (random weights, RT off: see tests/_server.py):

- HTTP level, no browser: the page at /, its assets, the bundled samples, BentoML's API page at /docs;
- POST /inspect and POST /attack_demo: their JSON, the attack's bounds (l_inf 8/255, queries, time), errors;
- in process: the Square attack (numpy) and the bare classifier's graph;
- end to end in a real headless Chromium driven by Playwright: upload an image, wait for the answer, compare the
  label shown with the API's, run the attack, see errors; screenshots go to the test's tmp dir. Skipped, with the
  reason, where /usr/bin/chromium or the playwright package is absent (never `playwright install`: the Debian
  package `chromium` is the browser).
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atop_serve import demo_attack, modelio, web
from atop_serve.demo_attack import BareClassifier, perturbation_picture, square_attack, square_side
from atop_serve.errors import ModelError

from tests._server import export_folder, png, serve

WEB_ENV = {
    "ATOP_MAX_REQUEST_BYTES": str(1024 * 1024), "ATOP_MAX_SAMPLES": "4", "ATOP_ALLOW_SEED": "1",
    "ATOP_ORT_THREADS": "1", "OMP_NUM_THREADS": "1",
    "ATOP_ATTACK_QUERIES": "60", "ATOP_ATTACK_SECONDS": "5",  # the query budget binds first: reproducible with a seed
}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def web_folder(det_folder, tmp_path_factory) -> Path:
    """det_folder with the card's pipeline.mirror set, as the shipped model has it, re-exported."""
    folder = shutil.copytree(det_folder, tmp_path_factory.mktemp("web") / "mirrored")
    card = modelio.read_card(folder)
    card["pipeline"]["mirror"] = True
    modelio.write_card(folder, card)
    return export_folder(folder)


@pytest.fixture(scope="module")
def server(web_folder, tmp_path_factory):
    with serve(web_folder, WEB_ENV, tmp_path_factory.mktemp("bentoml-web")) as running:
        yield running


@pytest.fixture(scope="module")
def sample() -> Path:
    return sorted(web.SAMPLES.glob("*.png"))[0]


def picture(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


# ------------------------------------------------------------------------------------------ page and assets
def test_root_serves_the_page(server):
    r = server.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for ref in ("/static/app.js", "/static/style.css", 'id="file"', 'id="samples-k"', 'id="attack-button"'):
        assert ref in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from the internet
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        asset = server.get(path)
        assert asset.status_code == 200 and kind in asset.headers["content-type"], (path, asset.headers)
        assert "http://" not in asset.text and "https://" not in asset.text
    assert server.get("/static/nothing-here.js").status_code == 404
    assert server.get("/static/../service.py").status_code == 404


def test_samples_listed_and_served(server):
    listed = server.get("/samples").json()
    assert 1 <= len(listed) <= 10 and {s["label"] for s in listed} <= set(CLASSES)
    for s in listed:
        r = server.get(s["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (32, 32)


def test_bundled_samples_are_small_cifar_pngs():
    files = sorted(web.SAMPLES.iterdir())
    assert 1 <= len(files) <= 10 and sum(f.stat().st_size for f in files) < 64 * 1024
    for f in files:
        assert re.fullmatch(r"[a-z]+-\d{4}\.png", f.name) and f.name.split("-")[0] in CLASSES, f.name
        with Image.open(f) as img:
            assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"


def test_api_routes_not_shadowed_and_docs_moved(server, sample):
    assert server.post("/classify", files={"image": ("a.png", sample.read_bytes())}).status_code == 200
    assert server.get("/metadata").status_code == 200 and server.get("/readyz").status_code == 200
    if web._bentoml_docs_page() is not None:
        docs = server.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_metadata_describes_the_attack_demo(server):
    demo = server.get("/metadata").json()["serving"]["attack_demo"]
    assert demo == {"available": True, "method": "square", "norm": "linf", "eps_255": 8, "max_queries": 60,
                    "time_limit_s": 5.0}


# ------------------------------------------------------------------------------------------ /inspect
def test_inspect(server, sample):
    data = sample.read_bytes()
    r = server.post("/inspect", files={"image": ("s.png", data)}, data={"samples": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"label", "class_id", "probabilities", "samples", "model", "input", "views"} <= set(body)
    api = server.post("/classify", files={"image": ("s.png", data)}, data={"samples": "3"}).json()
    assert body["label"] == api["label"] and body["samples"] == 3  # RT off: the same function
    assert np.allclose(list(body["probabilities"].values()), list(api["probabilities"].values()), atol=1e-5)
    pixels = np.asarray(Image.open(sample).convert("RGB"))
    assert np.array_equal(picture(body["input"]), pixels)
    assert [v["mirrored"] for v in body["views"]] == [False, True, False]  # the card's pipeline.mirror
    for v in body["views"]:  # RT(x) = x with the transform off, mirrored for the odd-numbered sample
        assert np.array_equal(picture(v["transformed"]), pixels[:, ::-1] if v["mirrored"] else pixels)
        assert not picture(v["mask"]).any() and picture(v["purified"]).shape == (32, 32, 3)
        assert v["label"] in CLASSES and 0 < v["probability"] <= 1


# ------------------------------------------------------------------------------------------ /attack_demo
def test_attack_demo(server, web_folder, sample):
    data = sample.read_bytes()
    r = server.post("/attack_demo", files={"image": ("s.png", data)}, data={"samples": "2", "seed": "5"})
    assert r.status_code == 200, r.text
    a = r.json()
    assert set(a) == {"bare", "purified", "samples", "fooled", "defended", "attack", "images", "model"}
    info = a["attack"]
    assert info["method"] == "square" and info["eps_255"] == 8 and abs(info["eps"] - 8 / 255) < 1e-6
    assert 1 <= info["queries"] <= info["max_queries"] == 60 and info["time_limit_s"] == 5.0
    assert info["seconds"] <= 5.0 + 1.0 and info["stopped"] in ("fooled", "time", "queries")
    assert (info["stopped"] == "fooled") == a["fooled"]
    x = np.asarray(Image.open(sample).convert("RGB")).astype(int)
    adv = picture(a["images"]["adversarial"]).astype(int)
    assert np.array_equal(picture(a["images"]["input"]), x)
    assert 0 < np.abs(adv - x).max() == info["linf_255"] <= 8  # inside the l_inf ball, exact 8-bit pixels
    assert np.array_equal(picture(a["images"]["perturbation"]), perturbation_picture(x, adv))
    # the bare classifier's answers are classifier.onnx's; the purified ones the pipeline's (/classify)
    bare = BareClassifier(web_folder, modelio.read_card(web_folder), threads=1)
    assert a["bare"]["clean"]["class_id"] == int(bare.logits(x[None].astype(np.uint8))[0].argmax())
    assert a["bare"]["adversarial"]["class_id"] == int(bare.logits(adv[None].astype(np.uint8))[0].argmax())
    assert a["fooled"] == (a["bare"]["adversarial"]["class_id"] != a["bare"]["clean"]["class_id"])
    clean = server.post("/classify", files={"image": ("s.png", data)}, data={"samples": "2"}).json()
    assert a["purified"]["clean"]["label"] == clean["label"] and a["samples"] == 2
    adv_answer = server.post("/classify", files={"image": ("a.png", png(adv.astype(np.uint8)))}).json()
    assert a["purified"]["adversarial"]["label"] == adv_answer["label"]
    assert a["defended"] == (a["purified"]["adversarial"]["class_id"] == a["bare"]["clean"]["class_id"])
    again = server.post("/attack_demo", files={"image": ("s.png", data)}, data={"samples": "2", "seed": "5"}).json()
    assert again["images"]["adversarial"] == a["images"]["adversarial"]  # a seed makes it reproducible


ATTACK_ERRORS = {  # name: (request keywords, status, text the message holds)
    "no image": ({"files": {"samples": (None, "1")}}, 400, "missing file field 'image'"),
    "not an image": ({"files": {"image": ("a.txt", b"hello")}}, 415, "not an image"),
    "empty file": ({"files": {"image": ("a.png", b"")}}, 400, "empty"),
    "too large": ({"files": {"image": ("a.png", b"\0" * (1024 * 1024 + 10))}}, 413, "too large"),
    "samples above max": ({"files": {"image": ("a.png", png(np.zeros((32, 32, 3), np.uint8)))},
                           "data": {"samples": "5"}}, 400, "less than or equal to 4"),
    "unknown field": ({"files": {"image": ("a.png", png(np.zeros((32, 32, 3), np.uint8)))},
                       "data": {"eps": "16"}}, 400, "unknown field 'eps'"),
    "json body": ({"json": {"image": "a.png"}}, 415, "multipart/form-data"),
}


@pytest.mark.parametrize("case", list(ATTACK_ERRORS))
def test_attack_demo_errors(server, case):
    kw, status, text = ATTACK_ERRORS[case]
    for path in ("/attack_demo", "/inspect"):
        r = server.post(path, **kw)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert set(r.json()) == {"error"} and text in r.json()["error"], r.json()


def test_concurrent_attacks_answer_or_say_busy(server, sample):
    data = sample.read_bytes()

    def ask(_):
        return server.post("/attack_demo", files={"image": ("s.png", data)})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert all(r.status_code in (200, 429) for r in answers), [r.text for r in answers]
    assert any(r.status_code == 200 for r in answers)
    for r in answers:
        if r.status_code == 429:
            assert "busy" in r.json()["error"]
    assert server.get("/readyz").status_code == 200
    assert "Traceback" not in server.log.read_text()


# ------------------------------------------------------------------------------------------ in process: attack
def _linear(w: np.ndarray, bias: float):
    """Two classes: logit 1 - logit 0 = w . (x / 255) + bias. Class 0 while that is negative."""
    def logits(pixels: np.ndarray) -> np.ndarray:
        s = (pixels.reshape(len(pixels), -1).astype(np.float64) / 255.0) @ w.ravel() + bias
        return np.stack([np.zeros_like(s), s], axis=1)

    return logits


def test_square_attack_fools_an_easy_model():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    w = rng.normal(size=(32, 32, 3))
    base = (image.astype(np.float64) / 255.0).ravel() @ w.ravel()
    best_push = 8 / 255 * np.abs(w).sum()  # what the optimal l_inf 8/255 perturbation adds
    fn = _linear(w, bias=-base - 0.3 * best_push)  # clean margin: 30 % of the best push
    assert fn(image[None])[0].argmax() == 0
    r = square_attack(fn, image, 0, max_queries=1000, time_limit=60, rng=np.random.default_rng(1))
    assert r.fooled and r.stopped == "fooled" and fn(r.adversarial[None])[0].argmax() == 1
    assert r.adversarial.dtype == np.uint8 and np.abs(r.adversarial.astype(int) - image).max() <= 8
    assert r.queries < 1000
    again = square_attack(fn, image, 0, max_queries=1000, time_limit=60, rng=np.random.default_rng(1))
    assert np.array_equal(again.adversarial, r.adversarial) and again.queries == r.queries


def test_square_attack_budgets():
    image = np.full((32, 32, 3), 128, np.uint8)
    robust = _linear(np.zeros((32, 32, 3)), bias=-1.0)  # never fooled
    calls = []

    def counting(x):
        calls.append(len(x))
        return robust(x)

    r = square_attack(counting, image, 0, max_queries=25, time_limit=60, rng=np.random.default_rng(0))
    assert (r.stopped, r.queries, len(calls), set(calls)) == ("queries", 25, 25, {1}) and not r.fooled
    ticks = iter(range(1000))  # a clock that advances 1 s per reading
    r = square_attack(robust, image, 0, max_queries=10_000, time_limit=5, clock=lambda: next(ticks))
    assert r.stopped == "time" and r.queries <= 6
    with pytest.raises(ValueError):
        square_attack(robust, image, 0, max_queries=0)


def test_square_schedule_and_perturbation_picture():
    sides = [square_side(i, 32 * 32, 32) for i in range(0, 12_000, 50)]
    assert sides[0] == 7 and sides == sorted(sides, reverse=True) and min(sides) >= 1  # sqrt(0.05 * 1024) = 7
    x = np.full((2, 2, 3), 100, np.uint8)
    adv = x.astype(int) + np.array([[[-8, 8, 0]]])
    assert perturbation_picture(x, adv).tolist()[0][0] == [0, 255, 128]


def test_bare_classifier_graph(det_folder, tmp_path):
    """classifier.onnx = the card's classifier with its TTA, reading its weights from classifier.safetensors."""
    import shutil

    import torch

    card = modelio.read_card(det_folder)
    bare = BareClassifier(det_folder, card, threads=1)
    assert (det_folder / modelio.CLASSIFIER_ONNX_FILE).stat().st_size < 1_000_000  # the weights are not copied
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = modelio.load_classifier(det_folder)(torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0).float()).numpy()
    assert np.abs(bare.logits(x) - ref).max() < 1e-4
    copy = shutil.copytree(det_folder, tmp_path / "copy")
    (copy / modelio.CLASSIFIER_FILE).write_bytes((copy / modelio.CLASSIFIER_FILE).read_bytes()[:-4] + b"\0" * 4)
    with pytest.raises(ModelError, match="re-export"):
        BareClassifier(copy, card, threads=1)
    (copy / modelio.CLASSIFIER_ONNX_FILE).unlink()
    with pytest.raises(ModelError, match="no classifier.onnx"):
        BareClassifier(copy, card, threads=1)


def test_bare_classifier_graph_reads_float16_weights(det_folder, tmp_path):
    """Weights packed as float16 (`atop pack --half`): the graph reads those bytes and casts them, no copy."""
    import torch

    from export.onnx_export import export_classifier
    from export.pack import pack

    packed = tmp_path / "packed"
    pack(det_folder, packed, half=True)
    eager = modelio.load_classifier(packed)
    path, shared = export_classifier(eager, packed / modelio.CLASSIFIER_ONNX_FILE, packed / modelio.CLASSIFIER_FILE)
    weights = (packed / modelio.CLASSIFIER_FILE).stat().st_size
    assert path.stat().st_size < 1_000_000 and shared["external_bytes"] > 0.95 * weights
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = eager(torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0).float()).numpy()
    bare = BareClassifier(packed, modelio.read_card(packed), threads=1)
    assert np.abs(bare.logits(x) - ref).max() < 1e-5


def test_attack_needs_no_torch(det_folder):
    """The attack demo runs where torch cannot be imported, as in the served process."""
    import subprocess
    import sys

    from tests._server import REPO

    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "import numpy as np\n"
        "from atop_serve import modelio, web\n"
        "from atop_serve.demo_attack import BareClassifier, square_attack\n"
        "bare = BareClassifier(sys.argv[1], modelio.read_card(sys.argv[1]), threads=1)\n"
        "x = np.zeros((32, 32, 3), np.uint8)\n"
        "r = square_attack(bare.logits, x, int(bare.logits(x[None])[0].argmax()), max_queries=5)\n"
        "print(r.queries, len(web.routes()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(det_folder)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    queries, routes = map(int, out.stdout.split())
    assert 1 <= queries <= 5 and routes >= 3


def test_attack_settings():
    from atop_serve.errors import AtopError
    from atop_serve.settings import Settings

    s = Settings.from_env({})
    assert (s.attack_seconds, s.attack_queries) == (5.0, 2000)
    assert Settings.from_env({"ATOP_ATTACK_SECONDS": "2.5", "ATOP_ATTACK_QUERIES": "300"}).attack_seconds == 2.5
    for bad in ({"ATOP_ATTACK_SECONDS": "0"}, {"ATOP_ATTACK_SECONDS": "31"}, {"ATOP_ATTACK_SECONDS": "nan"},
                {"ATOP_ATTACK_SECONDS": "soon"}, {"ATOP_ATTACK_QUERIES": "0"}):
        with pytest.raises(AtopError, match="ATOP_ATTACK"):
            Settings.from_env(bad)


def test_softmax_and_margin():
    p = demo_attack.softmax(np.array([1000.0, 1000.0, -1000.0]))
    assert np.allclose(p, [0.5, 0.5, 0.0])
    assert demo_attack.margin(np.array([3.0, 1.0, 2.0]), 0) == 1.0
    assert demo_attack.margin(np.array([1.0, 3.0]), 0) == -2.0


# ------------------------------------------------------------------------------------------ in a real browser
def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; the browser is Debian's chromium)"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_page_in_chromium(server, sample, tmp_path):
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "upload.png"
    upload.write_bytes(png(np.asarray(Image.open(sample).convert("RGB").resize((96, 96)))))  # not 32x32
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            assert page.locator("#samples button").count() == len(web.samples())
            assert page.locator("#samples-k option").count() == 4

            # upload a file: the label shown is the API's answer for the same image and K
            page.set_input_files("#file", str(upload))
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            k = int(page.input_value("#samples-k"))
            assert k == server.get("/metadata").json()["serving"]["limits"]["default_samples"]  # the page starts at the model's K
            api = server.post("/classify", files={"image": ("u.png", upload.read_bytes())}, data={"samples": str(k)})
            assert page.inner_text("#label") == api.json()["label"]
            assert page.locator("#bars .bar").count() == 10 and page.locator("#views .view").count() == k == 2
            assert page.locator("#views .view").nth(1).inner_text().startswith("sample 2 (mirrored)")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # the attack demo, side by side
            page.click("#attack-button")
            page.wait_for_selector("body[data-state=attacked]", timeout=60_000)
            assert page.inner_text("#atk-bare-adv") and page.inner_text("#atk-pur-adv")
            assert page.inner_text("#atk-defended") in ("defended", "not defended")
            assert "queries" in page.inner_text("#atk-stats")
            page.screenshot(path=str(tmp_path / "attack.png"), full_page=True)

            # a bundled sample, then a bad file: a readable message, not a crash
            page.click("#samples button >> nth=0")
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            assert page.inner_text("#label") in CLASSES
            page.set_input_files("#file", str(not_an_image))
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            message = page.inner_text("#error")
            assert "not an image" in message and "415" in message, message
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
        finally:
            browser.close()
    assert [q for q in problems if "415" not in q] == []  # the browser logs the 415 itself; nothing else
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("page.png", "attack.png", "error.png"))
