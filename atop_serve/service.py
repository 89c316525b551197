"""The HTTP service: adversarially robust CIFAR-10 classification f(g(RT(x))) with BentoML 1.4. No torch.

    bentoml serve                                   # from the repo root: bentofile.yaml names AtopService
    ATOP_MODEL=path/to/serving-folder bentoml serve --port 3000
    ATOP_MODEL=atop-default:latest bentoml serve    # a model from the BentoML model store

``AtopService`` holds the public endpoints (/classify, /classify_batch, /purify, /inspect, /attack_demo,
/metadata) and the web page at / (atop_serve/web.py). It runs in ATOP_WORKERS processes (default: one per core);
each loads the model and batches on its own: every endpoint turns its images into rows (one image x one
purification sample, fresh random draws each) and awaits its worker's ``RowBatcher`` (atop_serve/batcher.py),
which runs the rows of concurrent requests in one ONNX Runtime call on a model thread while the event loop goes on
reading and decoding requests. (Until 0.1 the rows went to a second BentoML service in its own process; that
internal hop and BentoML's batching around it cost more CPU per request than the model itself on this 2-core
machine: docs/benchmarks.md.) The attack demo's Square attack runs in a thread on the bare classifier's own small
graph (classifier.onnx), one attack at a time per worker. Settings: atop_serve/settings.py (``ATOP_*``).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from typing import Optional

import anyio
import anyio.to_thread
import bentoml
import numpy as np
import PIL
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__, demo_attack, heap, modelcard, settings, web
from .balance import ConnectionBalance
from .batcher import BatchStats, Overloaded, RowBatcher
from .engine import (View, images_row_seeds, load_engine, mean_over_samples, read_serving_card, row_seeds,
                     sample_rows)
from .errors import ImageError, ModelError
from .fastpath import ClassifyForm, FastClassify
from .forms import MAX_SEED, BatchInput, ClassifyInput, NoInput, PurifyInput, Rejected, Upload
from .imageio import FORMAT_NAMES, REDUCING_GAP, RESAMPLE, encode_png, open_image, plan, to_pixels
from .middleware import BodyLimit, ErrorBody
from .modelio import default_samples
from .openapi import CompleteSpec

SETTINGS = settings.load()
MODEL_FOLDER, MODEL_TAG = settings.resolve_model(SETTINGS.model)  # at import: `bentoml serve` fails fast, clearly
MODEL_CARD, MODEL_RT = read_serving_card(MODEL_FOLDER)
MODEL_LABEL = MODEL_TAG or MODEL_CARD.get("name") or MODEL_FOLDER.name  # the "model" of every answer
# K of a request that names none: the operator's ATOP_DEFAULT_SAMPLES, else the card's recommendation
DEFAULT_SAMPLES = SETTINGS.default_samples or min(default_samples(MODEL_CARD), SETTINGS.max_samples)
DECODE_THREADS = 2  # images decoded at once in threads: bounds the memory of large uploads
INLINE_DECODE_PIXELS = 128 * 128  # smaller images decode on the event loop (32x32 JPEG: ~0.1 ms), others in a thread
INLINE_DECODE_BYTES = 64 * 1024  # larger files are opened (header read) in a thread too: see AtopService._open
ATTACK_WAITING = 2  # attack demo requests that may wait while one runs; more get 429
log = logging.getLogger("bentoml.atop")


def _as_rejected(e: BaseException, where: str) -> BaseException:
    """An image's error as the 4xx answer naming the file (``where``); other errors unchanged."""
    return Rejected(f"{where}{e}", e.http_status) if isinstance(e, ImageError) else e


class Classification(BaseModel):
    label: str = Field(description="The predicted class (highest mean probability).")
    class_id: int = Field(description="Its index in the model card's class list.")
    probabilities: dict[str, float] = Field(description="Class -> probability, averaged over the samples.")
    samples: int = Field(description="Purifications averaged (K).")
    model: str = Field(description="The model that answered.")


class Prediction(BaseModel):
    label: str = Field(description="The predicted class.")
    class_id: int = Field(description="Its index in the model card's class list.")
    probabilities: dict[str, float] = Field(description="Class -> probability.")


class SampleView(BaseModel):
    """One purification sample: what RT did, what the purifier made of it, and what the classifier said."""

    transformed: str = Field(description="RT(x), the purifier's input: a 32x32 PNG as a data: URL.")
    mask: str = Field(description="RT's mask (white = missing pixel): a 32x32 PNG as a data: URL.")
    purified: str = Field(description="g(RT(x)): a 32x32 PNG as a data: URL.")
    label: str = Field(description="This sample's predicted class.")
    probability: float = Field(description="This sample's probability of that class.")
    mirrored: bool = Field(description="Whether this sample saw the image mirrored left-right (the card's "
                                       "pipeline.mirror: the odd-numbered samples).")


class Inspection(Classification):
    input: str = Field(description="The image as the model sees it (decoded, 32x32): a PNG as a data: URL.")
    views: list[SampleView] = Field(description="Per purification sample, in order; `probabilities` is their mean.")


class AttackInfo(BaseModel):
    method: str = Field(description="square: Square attack (Andriushchenko et al., 2020), score-based, no gradients.")
    norm: str = "linf"
    eps: float = Field(description="The l_inf budget, in [0, 1] pixel units (8/255).")
    eps_255: int = Field(description="The same budget in 8-bit steps.")
    linf_255: int = Field(description="The largest pixel change made, in 8-bit steps (<= eps_255).")
    queries: int = Field(description="Calls of the bare classifier.")
    max_queries: int
    seconds: float = Field(description="Time the attack ran.")
    time_limit_s: float
    stopped: str = Field(description="fooled (the bare classifier's label changed), time or queries (budget spent).")


class AttackPair(BaseModel):
    clean: Prediction
    adversarial: Prediction


class AttackImages(BaseModel):
    input: str = Field(description="The image as the model sees it (32x32 PNG, data: URL).")
    adversarial: str = Field(description="The adversarial image (32x32 PNG, data: URL): an exact 8-bit image.")
    perturbation: str = Field(description="adversarial - input, magnified: grey = unchanged, black/white = -/+eps.")


class AttackDemo(BaseModel):
    bare: AttackPair = Field(description="The bare classifier f (no purification) on the clean and adversarial image.")
    purified: AttackPair = Field(description="The defended pipeline f(g(RT(x))) on the same two images.")
    samples: int = Field(description="Purifications averaged for the purified predictions (K).")
    fooled: bool = Field(description="The bare classifier's label changed.")
    defended: bool = Field(description="The purified label on the adversarial image is the bare classifier's clean "
                                       "label (the label the attack moved f away from).")
    attack: AttackInfo
    images: AttackImages
    model: str


async def _get_metadata(request: Request) -> JSONResponse:
    return JSONResponse(await bentoml.get_current_service().describe())


MODEL_CARD_PAGE = modelcard.render(MODEL_CARD)  # the served card for people, rendered from the card it serves


async def _get_model_card(request: Request) -> Response:
    return Response(MODEL_CARD_PAGE, media_type="text/markdown; charset=utf-8",
                    headers={"X-Content-Type-Options": "nosniff"})


# GET /metadata beside the POST api, GET /model_card, and the web page (/, /static, /samples, /docs; atop_serve/web.py)
web_app = Starlette(routes=[Route("/metadata", _get_metadata, methods=["GET"]),
                            Route("/model_card", _get_model_card, methods=["GET"]), *web.routes()])


def _busy_is_503(endpoint):
    """An endpoint whose rows missed the batching deadline answers 503 with the reason and Retry-After (BentoML 1.4
    replaces the message of every 5xx exception with a generic one, so this one is answered, not raised)."""

    @functools.wraps(endpoint)
    async def answer(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except Overloaded as e:
            return JSONResponse(_busy_body(e), status_code=503, headers=BUSY_HEADERS)

    return answer


BUSY_HEADERS = {"Retry-After": "1"}  # of every 503 for a missed batching deadline, on either /classify path
_BUSY_ASGI_HEADERS = [(k.lower().encode(), v.encode()) for k, v in BUSY_HEADERS.items()]  # the fast path's form


def _busy_body(e: Overloaded) -> dict:
    return {"error": str(e)}


@functools.lru_cache(maxsize=1)
def _batch_metrics():
    """This worker's Prometheus metrics of the batcher (created once per process, after BentoML has set up
    prometheus_client's multi-process mode: /metrics sums them over the workers)."""
    import prometheus_client as prom

    rows = prom.Histogram("atop_model_batch_rows", "Rows (image x purification sample) per model call",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
    seconds = prom.Histogram("atop_model_call_seconds", "Duration of one model call (ONNX Runtime, all its rows)",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
    waited = prom.Histogram("atop_model_queue_seconds", "Time the oldest row of a model call waited for it",
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

    def record(stats: BatchStats) -> None:
        rows.observe(stats.rows)
        seconds.observe(stats.seconds)
        waited.observe(stats.waited)

    return record


# BentoML's tracing left unconfigured samples nothing and exports nothing, but its middleware still costs about a
# sixth of the CPU per request (docs/service.md, "Tracing"): every URL skips it unless tracing is set up
TRACING = {} if SETTINGS.tracing_enabled() else {"tracing": {"excluded_urls": [".*"]}}


@bentoml.asgi_app(web_app, path="/")
@bentoml.service(name="atop", workers=SETTINGS.serving_workers(), traffic={"timeout": 120, "max_concurrency": 256},
                 logging={"access": {"enabled": SETTINGS.access_log}}, **TRACING)
class AtopService:
    """Adversarially robust CIFAR-10 classification: purify g(RT(x)), then classify f."""

    if MODEL_TAG:  # a store model is packed into the Bento by `bentoml build`
        stored_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        start = time.perf_counter()
        self.card, self.classes, self.label = MODEL_CARD, MODEL_CARD["classes"], MODEL_LABEL
        self.size = MODEL_RT.image_size
        threads = SETTINGS.threads_per_worker()
        self.engine = load_engine(MODEL_FOLDER, threads, SETTINGS.providers, SETTINGS.graph)
        self.batcher = RowBatcher(self.engine.predict_rows, SETTINGS.max_batch_size, SETTINGS.max_latency_ms / 1000,
                                  on_call=_batch_metrics())
        self._decoding: anyio.CapacityLimiter | None = None
        self._attacking: anyio.CapacityLimiter | None = None
        self._attacks_waiting = 0
        self.bare: demo_attack.BareClassifier | None = None
        self.bare_missing = ""  # why the attack demo is unavailable
        try:
            self.bare = demo_attack.BareClassifier(MODEL_FOLDER, self.card, threads, SETTINGS.providers)
        except ModelError as e:
            self.bare_missing = str(e)
        log.info("atop service: model %s (%s) | backend %s, %s | providers %s | RT %s | %d classes | %d worker(s) x %d "
                 "thread(s) | batches up to %d rows, deadline %d ms | seeds %s | limits: %d samples, %d images, %d "
                 "bytes, %d pixels, %d pixels a request | attack demo %s | loaded in %.1f s",
                 self.label, MODEL_FOLDER, self.engine.backend, self.engine.describe().get("graph", "eager"),
                 ",".join(self.engine.providers), self.engine.rt.kind, len(self.classes),
                 SETTINGS.serving_workers(), threads, SETTINGS.max_batch_size, SETTINGS.max_latency_ms,
                 "allowed" if SETTINGS.allow_seed else "refused", SETTINGS.max_samples,
                 SETTINGS.max_images, SETTINGS.max_request_bytes, SETTINGS.max_pixels, SETTINGS.max_request_pixels,
                 f"on ({SETTINGS.attack_seconds:g} s, {SETTINGS.attack_queries} queries)" if self.bare
                 else f"off: {self.bare_missing}", time.perf_counter() - start)

    # ------------------------------------------------------------------ endpoints
    @bentoml.api(route="/classify", input_spec=ClassifyInput)
    @_busy_is_503
    async def classify(self, image: Upload, samples: Optional[int] = None, seed: Optional[int] = None) -> Classification:
        """Classify one image: label, class id and class probabilities averaged over `samples` purifications."""
        return await self._classify(image, samples, seed)

    @bentoml.api(route="/classify_batch", input_spec=BatchInput)
    @_busy_is_503
    async def classify_batch(self, images: list[Upload], samples: Optional[int] = None,
                             seed: Optional[int] = None) -> list[Classification]:
        """Classify several images (repeat the `images` field); the answers come in the order of the files."""
        self._check_seed(seed)
        samples = samples or DEFAULT_SAMPLES
        pixels = await self._decode_all(images, [f"image {i + 1} of {len(images)}: " for i in range(len(images))])
        return [self._classification(p, samples) for p in await self._probs(pixels, samples, seed)]

    @bentoml.api(route="/purify", input_spec=PurifyInput)
    @_busy_is_503
    async def purify(self, image: Upload, view: View = "purified", seed: Optional[int] = None) -> Image.Image:
        """The purified 32x32 image g(RT(x)) as PNG; view=transformed gives RT(x), view=mask the RT mask."""
        self._check_seed(seed)
        pixels = await self._decode(image)
        _, [picture] = await self._rows(self._array([pixels]), row_seeds(seed, 1), [view])
        return Image.fromarray(picture)

    @bentoml.api(route="/inspect", input_spec=ClassifyInput)
    @_busy_is_503
    async def inspect(self, image: Upload, samples: Optional[int] = None, seed: Optional[int] = None) -> Inspection:
        """/classify plus the pictures of the defence (what the web page shows): the 32x32 input and, per
        purification sample, RT(x), its mask, g(RT(x)) and that sample's prediction."""
        self._check_seed(seed)
        samples = samples or DEFAULT_SAMPLES
        pixels = await self._decode(image)
        seeds = row_seeds(seed, samples)  # the three views of a sample share its seed, hence its draws
        kinds = ("transformed", "mask", "purified")
        rows = np.repeat(sample_rows(self._array([pixels]), samples, self.engine.mirror), len(kinds), axis=0)
        row_probs, pictures = await self._rows(rows, [s for s in seeds for _ in kinds], list(kinds) * samples)
        views, probs = [], []
        for i in range(samples):
            transformed, mask, purified = pictures[3 * i : 3 * i + 3]
            p = row_probs[3 * i + 2]
            probs.append(p)
            views.append(SampleView(transformed=self._png_url(transformed), mask=self._png_url(mask),
                                    purified=self._png_url(purified), label=self.classes[int(p.argmax())],
                                    probability=round(float(p.max()), 6),
                                    mirrored=self.engine.mirror and i % 2 == 1))
        answer = self._classification(mean_over_samples(np.array(probs), samples)[0], samples)
        return Inspection(**answer.model_dump(), input=self._png_url(pixels), views=views)

    @bentoml.api(route="/attack_demo", input_spec=ClassifyInput)
    @_busy_is_503
    async def attack_demo(self, image: Upload, samples: Optional[int] = None, seed: Optional[int] = None) -> AttackDemo:
        """Attack demo: a Square attack (l_inf 8/255, black box, bounded in time and queries) on the bare classifier f,
        then f and the purified pipeline on the clean and the adversarial image (fooled? defended?)."""
        self._check_seed(seed)
        samples = samples or DEFAULT_SAMPLES
        if self.bare is None:
            raise Rejected(f"the attack demo is not available on this server: {self.bare_missing}", 404)
        pixels = await self._decode(image)
        clean_logits, result = await self._attack(np.frombuffer(pixels, np.uint8).reshape(self.size, self.size, 3),
                                                  seed)
        adversarial = result.adversarial.tobytes()
        clean_probs, adv_probs = await self._probs([pixels, adversarial], samples, seed)
        x = np.frombuffer(pixels, np.uint8).reshape(result.adversarial.shape)
        perturbation = demo_attack.perturbation_picture(x, result.adversarial).tobytes()
        bare = AttackPair(clean=self._prediction(demo_attack.softmax(clean_logits)),
                          adversarial=self._prediction(demo_attack.softmax(result.logits)))
        purified = AttackPair(clean=self._prediction(clean_probs), adversarial=self._prediction(adv_probs))
        eps = demo_attack.EPS_255
        return AttackDemo(
            bare=bare, purified=purified, samples=samples, model=self.label,
            fooled=bare.adversarial.class_id != bare.clean.class_id,
            defended=purified.adversarial.class_id == bare.clean.class_id,
            attack=AttackInfo(method="square", eps=round(eps / 255, 6), eps_255=eps,
                              linf_255=int(np.abs(result.adversarial.astype(np.int16) - x).max()),
                              queries=result.queries, max_queries=SETTINGS.attack_queries,
                              seconds=round(result.seconds, 3), time_limit_s=SETTINGS.attack_seconds,
                              stopped=result.stopped),
            images=AttackImages(input=self._png_url(pixels), adversarial=self._png_url(adversarial),
                                perturbation=self._png_url(perturbation)))

    @bentoml.api(route="/metadata", input_spec=NoInput)
    async def metadata(self) -> dict:
        """The model card (classes, RT config, provenance, measured metrics) and the serving setup and versions."""
        return await self.describe()

    # ------------------------------------------------------------------ helpers
    async def _classify(self, image: Upload, samples: int | None, seed: int | None) -> Classification:
        """/classify, on either path: the API's, and the fast path's (atop_serve/fastpath.py)."""
        self._check_seed(seed)
        samples = samples or DEFAULT_SAMPLES
        [probs] = await self._probs([await self._decode(image)], samples, seed)
        return self._classification(probs, samples)

    async def describe(self) -> dict:
        engine = self.engine.describe()
        return {**self.card, "serving": {
            "model": self.label, "backend": engine["backend"], "providers": engine["providers"],
            "graph": engine.get("graph", "eager"), "variant": engine.get("variant", "fp32"),
            **({"variant_not_served": engine["variant_not_served"]} if "variant_not_served" in engine else {}),
            "versions": {"atop_serve": __version__, "bentoml": bentoml.__version__, "numpy": np.__version__,
                         "pillow": PIL.__version__, **engine["versions"]},
            "input": {"formats": FORMAT_NAMES, "size": [self.size, self.size],
                      "resize": f"whole image, no crop, {RESAMPLE.name.lower()} antialiased, "
                                f"reducing_gap={REDUCING_GAP}",
                      "transparency": "composited on white", "exif_orientation": "applied"},
            "limits": {"max_samples": SETTINGS.max_samples, "default_samples": DEFAULT_SAMPLES, "max_images": SETTINGS.max_images,
                       "max_request_bytes": SETTINGS.max_request_bytes, "max_pixels": SETTINGS.max_pixels,
                       "max_request_pixels": SETTINGS.max_request_pixels},
            "batching": {"max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms,
                         "workers": SETTINGS.serving_workers(), "threads_per_worker": SETTINGS.threads_per_worker()},
            "seed_allowed": SETTINGS.allow_seed, "fast_path": SETTINGS.fast_path,
            "attack_demo": {"available": self.bare is not None, **({"reason": self.bare_missing} if self.bare is None
                                                                   else {}),
                            "method": "square", "norm": "linf", "eps_255": demo_attack.EPS_255,
                            "max_queries": SETTINGS.attack_queries, "time_limit_s": SETTINGS.attack_seconds},
        }}

    def _check_seed(self, seed: int | None) -> None:
        if seed is not None and not SETTINGS.allow_seed:
            raise Rejected("the seed parameter is disabled on this server: every request gets fresh, unpredictable "
                           "random draws (an operator can allow seeds with ATOP_ALLOW_SEED=1)")

    async def _decode(self, upload: Upload, where: str = "") -> bytes:
        [pixels] = await self._decode_all([upload], [where])
        return pixels

    async def _decode_all(self, uploads: list[Upload], wheres: list[str]) -> list[bytes]:
        """Uploads -> their pixels (bytes of uint8 size x size x 3 each), in order. Every header is read first, so
        each image's size is known before any pixel is decoded: an image above ATOP_MAX_PIXELS, or a request whose
        images decode to more than ATOP_MAX_REQUEST_PIXELS in all, is refused (413) before the costly part. The
        error is the first bad file in upload order (files whose header cannot be read before those whose pixels
        cannot), prefixed with ``wheres``."""
        if self._decoding is None:
            self._decoding = anyio.CapacityLimiter(DECODE_THREADS)
        opened = await asyncio.gather(*(self._open(u) for u in uploads), return_exceptions=True)
        try:
            costs = []
            for img, where in zip(opened, wheres):
                if isinstance(img, BaseException):
                    raise _as_rejected(img, where)
                try:
                    costs.append(plan(img, self.size, SETTINGS.max_pixels))
                except ImageError as e:
                    raise _as_rejected(e, where) from None
            total = sum(costs)
            if total > SETTINGS.max_request_pixels:
                raise Rejected(f"the {len(uploads)} images of this request decode to {total / 1e6:.1f} MP in all; "
                               f"the limit is {SETTINGS.max_request_pixels / 1e6:g} MP per request: send fewer or "
                               "smaller images in each", 413)
        except BaseException:
            for img in opened:
                if isinstance(img, Image.Image):
                    img.close()
            raise
        done = await asyncio.gather(*(self._pixels(img, len(u.read_bytes()) > INLINE_DECODE_BYTES)
                                      for img, u in zip(opened, uploads)), return_exceptions=True)
        for d, where in zip(done, wheres):
            if isinstance(d, BaseException):
                raise _as_rejected(d, where)
        return list(done)

    async def _open(self, upload: Upload) -> Image.Image:
        """An upload's header (``open_image``): in a decoding thread for a large file, where even the header can
        take seconds (a 32x32 PNG with 700,000 empty chunks in 8 MB: 4 s) and would stall every request of the
        worker on the event loop; 64 KiB take at most ~30 ms."""
        data = upload.read_bytes()
        if len(data) > INLINE_DECODE_BYTES:
            return await anyio.to_thread.run_sync(open_image, data, limiter=self._decoding)
        return open_image(data)

    async def _pixels(self, img: Image.Image, large_file: bool) -> bytes:
        """An opened, planned image -> its pixels: on the event loop for a thumbnail (faster than a hop to a thread
        and back), in a decoding thread otherwise; the image is closed either way."""
        def work(img: Image.Image) -> bytes:
            with img:
                try:
                    return to_pixels(img, self.size, SETTINGS.max_pixels).tobytes()
                finally:
                    if img.size[0] * img.size[1] > heap.TRIM_PIXELS:
                        heap.trim()  # the decode's hundreds of MB back to the OS, not kept by the worker

        w, h = img.size
        if not large_file and w * h <= INLINE_DECODE_PIXELS:
            return work(img)
        return await anyio.to_thread.run_sync(work, img, limiter=self._decoding)

    async def _probs(self, pixels: list[bytes], samples: int, seed: int | None) -> list[np.ndarray]:
        """Mean class probabilities of each image over `samples` purifications, each with its own draws (and the
        odd-numbered ones on the mirrored image where the card says so)."""
        seeds = images_row_seeds([seed] * len(pixels), samples)
        probs, _ = await self._rows(sample_rows(self._array(pixels), samples, self.engine.mirror), seeds)
        return list(mean_over_samples(probs, samples))

    def _array(self, pixels: list[bytes]) -> np.ndarray:
        """Decoded images (bytes of uint8 size x size x 3 each) -> one uint8 array (N, size, size, 3)."""
        return np.frombuffer(b"".join(pixels), np.uint8).reshape(len(pixels), self.size, self.size, 3)

    async def _rows(self, images: np.ndarray, seeds: list[int], views: list[str | None] = ()):
        """Rows (uint8 images (R, size, size, 3), a seed each, optional views) through this worker's batcher ->
        (probs, pictures)."""
        return await self.batcher.run(images, seeds, views)

    async def _attack(self, image: np.ndarray, seed: int | None) -> tuple[np.ndarray, demo_attack.AttackResult]:
        """The bare classifier's clean logits and one Square attack on it, in a thread, one attack at a time (it keeps
        a core busy for up to ATOP_ATTACK_SECONDS); ATTACK_WAITING requests may wait for their turn, more get 429."""
        if self._attacking is None:
            self._attacking = anyio.CapacityLimiter(1)
        if self._attacking.borrowed_tokens and self._attacks_waiting >= ATTACK_WAITING:
            raise Rejected(f"the attack demo is busy ({1 + self._attacks_waiting} attacks running or waiting, each up "
                           f"to {SETTINGS.attack_seconds:g} s): try again in a few seconds", 429)
        bare = self.bare
        assert bare is not None

        def work() -> tuple[np.ndarray, demo_attack.AttackResult]:
            rng = np.random.default_rng(None if seed is None else [seed, 1])  # a stream apart from the RT draws'
            clean = bare.logits(image[None])[0]
            return clean, demo_attack.square_attack(bare.logits, image, int(clean.argmax()), demo_attack.EPS_255,
                                                    SETTINGS.attack_queries, SETTINGS.attack_seconds, rng)

        self._attacks_waiting += 1
        waiting = True
        try:
            async with self._attacking:
                self._attacks_waiting, waiting = self._attacks_waiting - 1, False
                return await anyio.to_thread.run_sync(work)
        finally:
            if waiting:  # cancelled while waiting for its turn
                self._attacks_waiting -= 1

    def _png_url(self, pixels: bytes | np.ndarray) -> str:
        """uint8 RGB (size x size x 3, as bytes or an array) -> a PNG data: URL."""
        a = np.frombuffer(pixels, np.uint8) if isinstance(pixels, bytes) else np.asarray(pixels, np.uint8)
        a = a.reshape(self.size, self.size, 3)
        return "data:image/png;base64," + base64.b64encode(encode_png(a)).decode("ascii")

    def _prediction(self, probs: np.ndarray) -> Prediction:
        best = int(np.argmax(probs))
        return Prediction(label=self.classes[best], class_id=best,
                          probabilities={c: round(float(p), 6) for c, p in zip(self.classes, probs)})

    def _classification(self, probs: np.ndarray, samples: int) -> Classification:
        best = int(np.argmax(probs))
        return Classification(label=self.classes[best], class_id=best, samples=samples, model=self.label,
                              probabilities={c: round(float(p), 6) for c, p in zip(self.classes, probs)})


class _RejectedAsInfo(logging.Filter):
    """BentoML logs every exception an API raises at ERROR with a traceback; a client's mistake is one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Rejected):
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
            record.msg, record.args = "%s [%s] rejected (%d): %s", (*record.args, exc.error_code.value, exc.message)
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_RejectedAsInfo())
# BentoML 1.4 works out the media type of an answer from its JSON schema on every response (8 % of a worker's main
# thread under load at concurrency 32) unless the output spec names one: these answers are JSON.
for _api in ("classify", "classify_batch", "inspect", "attack_demo", "metadata"):
    AtopService.apis[_api].output_spec.media_type = "application/json"
AtopService.add_asgi_middleware(ConnectionBalance, workers=SETTINGS.serving_workers(),
                                worker_index=lambda: bentoml.server_context.worker_index)
AtopService.add_asgi_middleware(ErrorBody)
AtopService.add_asgi_middleware(CompleteSpec)  # /docs.json lists every answer and GET route
AtopService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_request_bytes)
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"server", b"BentoML Service/atop")]


async def _fast_classify(form: ClassifyForm) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The fast path's /classify (atop_serve/fastpath.py): the API's code, its answer as BentoML would send it."""
    service: AtopService = bentoml.get_current_service()
    try:
        answer = await service._classify(Upload(form.image, form.filename, form.content_type), form.samples, form.seed)
    except Overloaded as e:  # as _busy_is_503 answers it
        return 503, [*_JSON_HEADERS, *_BUSY_ASGI_HEADERS], json.dumps(_busy_body(e)).encode()
    return 200, _JSON_HEADERS, answer.model_dump_json().encode()


@functools.lru_cache(maxsize=1)
def _fast_path_counter():
    """This worker's Prometheus counter of the fast path's requests by outcome (answered, fallback)."""
    import prometheus_client as prom

    counter = prom.Counter("atop_fast_path_requests", "/classify requests the fast path read, by outcome: answered "
                           "by it, or handed to BentoML's API layer (anything but a plain form, or an error)",
                           ["outcome"])
    return lambda outcome: counter.labels(outcome).inc()


if SETTINGS.fast_path:  # innermost of the service's middleware: inside the body limit, the balancing, the error shape
    AtopService.add_asgi_middleware(FastClassify, path="/classify", handler=_fast_classify,
                                    max_samples=SETTINGS.max_samples, max_seed=MAX_SEED,
                                    count=lambda outcome: _fast_path_counter()(outcome))
