"""Service settings, read once from the environment (``ATOP_*``). No torch, no BentoML import at module level.

    ATOP_MODEL               model to serve: a serving folder path, or a BentoML model store tag such as
                             ``atop-default:latest`` whose directory is a serving folder; default: the shipped
                             atop_serve/models/default
    ATOP_ALLOW_SEED          1 lets requests pass ``seed`` (reproducible RT draws); default 0: a seed is refused
    ATOP_MAX_SAMPLES         largest ``samples`` (K purifications averaged) a request may ask for
    ATOP_DEFAULT_SAMPLES     ``samples`` of a request that names none (0, the default: the K the model card recommends,
                             ``pipeline.samples``, at most ATOP_MAX_SAMPLES)
    ATOP_MAX_IMAGES          largest number of images in one /classify_batch request
    ATOP_MAX_REQUEST_BYTES   largest request body, in bytes (413 above)
    ATOP_MAX_PIXELS          largest decoded image, width x height (413 above)
    ATOP_MAX_REQUEST_PIXELS  most pixels the images of one request decode to in all (413 above; at least
                             ATOP_MAX_PIXELS): bounds the decoding work of one /classify_batch (a JPEG far larger
                             than 32x32 counts at the reduced scale it decodes at)
    ATOP_MAX_BATCH_SIZE      batching: most purification samples (rows) in one model call
    ATOP_MAX_LATENCY_MS      batching: the queueing deadline; a request whose rows are still queued after it gets 503,
                             so keep it above the time of the largest request (max images x max samples rows)
    ATOP_WORKERS             serving processes, each with the model and its own batcher (0, the default: one per
                             usable CPU core, at most 4; on a GPU each worker holds its own CUDA session)
    ATOP_ORT_THREADS         ONNX Runtime intra-op threads per worker (0, the default: usable cores / workers, >= 1)
    ATOP_ACCESS_LOG          1 (default) logs one line per request (BentoML's access log); 0 turns it off (/metrics
                             still counts requests, and rejected requests are still logged)
    ATOP_FAST_PATH           1 (default): a plain /classify form (an image file, optional samples and seed) is parsed
                             and answered without BentoML's API layer (atop_serve/fastpath.py), every other request
                             as before; 0: every request through BentoML's API layer
    ATOP_TRACING             auto (default): BentoML's OpenTelemetry tracing runs only where BentoML's own configuration
                             sets tracing up (BENTOML_CONFIG_OPTIONS, or the file BENTOML_CONFIG names, mentions
                             ``tracing``); otherwise requests skip its middleware, which then exports nothing yet costs
                             about a sixth of the CPU per request (docs/service.md); on: always; off: never
    ATOP_ATTACK_SECONDS      the attack demo (POST /attack_demo): time limit of one attack, seconds (0 < s <= 30)
    ATOP_ATTACK_QUERIES      the attack demo: most queries (classifier calls) of one attack
    ATOP_GRAPH               which exported graph runs: auto (default: pipeline.opt.onnx, the faster CPU variant, when
                             the card ships one and the session runs on CPU; else pipeline.onnx), fp32, opt
    ATOP_PROVIDERS           comma-separated ONNX Runtime execution providers, in order of preference; default:
                             CUDA when present, then CPU (TensorRT only when named here: it builds an engine per
                             new input shape, slow with adaptive batching unless its engine cache is warm)
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import AtopError, ModelError
from .imageio import DEFAULT_MAX_PIXELS

# 4 x the largest single image: 4 x 49 MP PNGs decode in about 1.5 s on 2 cores, 50 of them took 16-18 s (docs/service.md)
DEFAULT_MAX_REQUEST_PIXELS = 4 * DEFAULT_MAX_PIXELS

GRAPH_CHOICES = ("auto", "fp32", "opt")
TRACING_CHOICES = ("auto", "on", "off")
MAX_ATTACK_SECONDS = 30.0  # one attack holds a CPU core for this long at most
MAX_AUTO_WORKERS = 4  # automatic workers: each holds a copy of the model and forms its own batches
_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class Settings:
    model: str = ""                          # folder or store tag; "" = the shipped default folder
    allow_seed: bool = False                 # accept the `seed` field (reproducible draws)
    max_samples: int = 8                     # purifications one image may ask for
    default_samples: int = 0                 # K when a request names none; 0: the model card's (pipeline.samples)
    max_images: int = 64                     # files in one /classify_batch
    max_request_bytes: int = 10 * 1024 * 1024  # request body, bytes
    max_pixels: int = DEFAULT_MAX_PIXELS     # decoded image, width x height
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # decoded pixels of one request's images in all
    max_batch_size: int = 128                # rows (image x sample) per model call (docs/benchmarks.md)
    max_latency_ms: int = 2100               # batching queue deadline, ms (503 beyond; docs/benchmarks.md)
    workers: int = 0                         # serving processes; 0: one per usable core, at most MAX_AUTO_WORKERS
    ort_threads: int = 0                     # ONNX Runtime threads per worker; 0: usable cores / workers
    access_log: bool = True                  # BentoML's per-request log line
    fast_path: bool = True                   # plain /classify forms skip BentoML's API layer (atop_serve/fastpath.py)
    tracing: str = "auto"                    # BentoML's OpenTelemetry middleware: auto (where configured), on, off
    providers: tuple[str, ...] = ()          # () = automatic (CUDA if present, then CPU)
    graph: str = "auto"                      # auto: the card's faster CPU variant on CPU, else fp32; fp32; opt
    attack_seconds: float = 5.0              # attack demo: time limit of one attack, s
    attack_queries: int = 2000               # attack demo: classifier calls of one attack

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            raw = env.get(f"ATOP_{f.name.upper()}")
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            try:
                if f.type == "bool":
                    if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    kw[f.name] = raw.lower() in ("1", "true", "yes")
                elif f.type == "int":
                    kw[f.name] = int(raw)
                elif f.type == "float":
                    kw[f.name] = float(raw)
                elif f.name == "providers":
                    kw[f.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
                else:
                    kw[f.name] = raw
            except ValueError:
                raise AtopError(f"ATOP_{f.name.upper()}={raw!r} is not a valid {f.type}") from None
        s = cls(**kw)
        positive = ("max_samples", "max_images", "max_request_bytes", "max_pixels", "max_request_pixels",
                    "max_batch_size", "max_latency_ms", "attack_queries")
        for name in positive:
            if getattr(s, name) < 1:
                raise AtopError(f"ATOP_{name.upper()} must be >= 1, got {getattr(s, name)}")
        if s.max_request_pixels < s.max_pixels:
            raise AtopError(f"ATOP_MAX_REQUEST_PIXELS ({s.max_request_pixels}) must be at least ATOP_MAX_PIXELS "
                            f"({s.max_pixels}): else a single image within the per-image limit would be refused")
        if not 0 < s.attack_seconds <= MAX_ATTACK_SECONDS:  # `not` also catches NaN
            raise AtopError(f"ATOP_ATTACK_SECONDS must be in (0, {MAX_ATTACK_SECONDS:g}], got {s.attack_seconds}")
        if not 0 <= s.default_samples <= s.max_samples:
            raise AtopError(f"ATOP_DEFAULT_SAMPLES must be in 0..ATOP_MAX_SAMPLES ({s.max_samples}), got {s.default_samples}")
        if s.graph not in GRAPH_CHOICES:
            raise AtopError(f"ATOP_GRAPH={s.graph!r}: valid: {', '.join(GRAPH_CHOICES)}")
        if s.tracing not in TRACING_CHOICES:
            raise AtopError(f"ATOP_TRACING={s.tracing!r}: valid: {', '.join(TRACING_CHOICES)}")
        if s.workers < 0 or s.ort_threads < 0:
            raise AtopError("ATOP_WORKERS and ATOP_ORT_THREADS must be >= 0 (0: automatic)")
        return s

    def serving_workers(self) -> int:
        """Serving processes: ATOP_WORKERS, or one per usable core (at most MAX_AUTO_WORKERS)."""
        return self.workers or max(1, min(usable_cores(), MAX_AUTO_WORKERS))

    def threads_per_worker(self) -> int:
        """ONNX Runtime intra-op threads of each worker: ATOP_ORT_THREADS, or the usable cores shared out."""
        return self.ort_threads or max(1, usable_cores() // self.serving_workers())

    def tracing_enabled(self, env=None) -> bool:
        """Whether requests pass through BentoML's OpenTelemetry middleware: ATOP_TRACING on/off, or (auto) whether
        BentoML's configuration sets tracing up. Unconfigured, BentoML samples no trace and exports nothing, yet its
        middleware still makes spans for every request and every message of it."""
        if self.tracing != "auto":
            return self.tracing == "on"
        return bentoml_tracing_configured(env)


def bentoml_tracing_configured(env=None) -> bool:
    """Whether BentoML's own configuration mentions tracing: BENTOML_CONFIG_OPTIONS, or the YAML file BENTOML_CONFIG
    names (an unreadable file counts as configured: BentoML reports it, this does not second-guess it)."""
    env = os.environ if env is None else env
    if "tracing" in env.get("BENTOML_CONFIG_OPTIONS", ""):
        return True
    path = env.get("BENTOML_CONFIG", "").strip()
    if not path:
        return False
    try:
        return "tracing" in Path(path).read_text(errors="replace")
    except OSError:
        return True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup CPU quotas are not read)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def load() -> Settings:
    """This process's settings (read from the environment once)."""
    return Settings.from_env()


def model_tag(spec: str) -> str | None:
    """The BentoML model store tag ATOP_MODEL names, or None when it names a folder (or nothing)."""
    if not spec or spec == "default" or Path(spec).exists() or not _TAG.match(spec):
        return None
    return spec


def resolve_model(spec: str) -> tuple[Path, str | None]:
    """ATOP_MODEL -> (serving folder, the resolved store tag or None). Tags need BentoML's model store."""
    from .modelio import resolve

    tag = model_tag(spec)
    if tag is None:
        try:
            return resolve(spec or None), None
        except ModelError as e:
            raise ModelError(f"{e}: set ATOP_MODEL to a serving folder or a BentoML model store tag"
                             + ("" if spec else ", or ship the default folder (atop export)")) from None
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(tag)
    except NotFound:
        raise ModelError(f"ATOP_MODEL={spec!r}: no such model in the BentoML model store "
                         "(nor a folder of that name); see `bentoml models list`") from None
    return Path(stored.path), str(stored.tag)
