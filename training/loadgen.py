"""HTTP load generator for the service, and a `bentoml serve` subprocess to aim it at. No torch.

    payloads, source = load_images(n=500)                             # real CIFAR-10 test JPEGs, as bytes
    with serve(folder, {"ATOP_MAX_BATCH_SIZE": "64"}) as server:         # a real `bentoml serve`, torn down after
        before = server_metrics(server.url)
        result = run_load(server.url, payloads, concurrency=32, max_requests=1000, max_seconds=20)
        inside = metrics_delta(before, server_metrics(server.url))     # the server's account: model calls, rows, ...

``run_load`` keeps ``concurrency`` requests in flight (one asyncio task each, on one ``aiohttp.ClientSession``) until
``max_requests`` were sent or ``max_seconds`` passed, whichever comes first: it always stops by itself. Every
request is counted: an answer other than 200, a transport error or a timeout is an error (by kind), never a
crash. It only talks to this machine (127.0.0.1, localhost, ::1).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

from atop_serve.errors import AtopError

REPO = Path(__file__).resolve().parents[1]  # bentofile.yaml lives here: `bentoml serve` runs from this folder
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


# ------------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict:
    """p50/p95/p99/mean/min/max in milliseconds of a list of durations in seconds (None values if empty)."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")
    if not seconds:
        return {**dict.fromkeys(keys), "n": 0}
    ms = [1000.0 * s for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 3), "p95_ms": round(percentile(ms, 95), 3),
            "p99_ms": round(percentile(ms, 99), 3), "mean_ms": round(sum(ms) / len(ms), 3),
            "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3), "n": len(ms)}


# ------------------------------------------------------------------------------------------ payloads
@dataclass(frozen=True)
class Payload:
    name: str
    data: bytes
    mime: str = "image/jpeg"
    label: int | None = None  # class index (sorted class folders) when known


def default_data_root() -> Path:
    """``$ATOP_DATA`` if set, else ``../shared/data/cifar10-jpeg`` beside the checkout (as training.data)."""
    return Path(os.environ.get("ATOP_DATA", REPO.parent / "shared" / "data" / "cifar10-jpeg"))


def load_images(root: str | Path | None = None, n: int = 500, split: str = "test", seed: int = 0) -> tuple[list[Payload], str]:
    """``n`` real image files from ``<root>/<split>/<class>/*`` (class-balanced, a seeded choice), as bytes with
    their labels; where the dataset is absent, ``n`` random 32x32 PNGs. Returns (payloads, description of the source)."""
    split_dir = Path(root or default_data_root()) / split
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
    if not classes:
        if root:
            raise AtopError(f"no image folders in {split_dir} (expected <root>/{split}/<class>/*.jpg)")
        return synthetic_images(n, seed), f"{n} random 32x32 PNG images (no dataset at {split_dir})"
    rng = random.Random(seed)
    per_class = [sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_EXTS) for c in classes]
    for files in per_class:
        rng.shuffle(files)
    chosen: list[Payload] = []
    i = 0
    while len(chosen) < n and any(i < len(f) for f in per_class):
        for label, files in enumerate(per_class):
            if i < len(files) and len(chosen) < n:
                p = files[i]
                chosen.append(Payload(f"{classes[label]}-{p.name}", p.read_bytes(), MIME[p.suffix.lower()], label))
        i += 1
    rng.shuffle(chosen)
    return chosen, f"{len(chosen)} files of {split_dir} (class-balanced, seed {seed})"


def synthetic_images(n: int, seed: int = 0) -> list[Payload]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(Payload(f"random-{i}.png", buf.getvalue(), "image/png"))
    return out


# ------------------------------------------------------------------------------------------ load
def check_local(url: str) -> str:
    """The URL without a trailing slash; AtopError unless it is http(s) on this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or (parts.hostname or "") not in LOCAL_HOSTS:
        raise AtopError(f"the load generator only talks to this machine (http://127.0.0.1:<port>), not {url!r}")
    return url.rstrip("/")


@dataclass
class _Record:
    start: float
    seconds: float
    error: str | None
    label: int | None
    predicted: int | None


@dataclass
class LoadResult:
    url: str
    endpoint: str
    concurrency: int
    samples: int
    sent: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    requests_per_s: float
    latency_ok: dict
    latency_all: dict
    accuracy: float | None  # share of answered labelled requests whose class_id is the label
    stopped_by: str  # "requests" or "time"
    client_cpu: float = 0.0  # cores the load generator itself kept busy (its process's CPU time / wall time)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_load(url: str, payloads: Sequence[Payload], concurrency: int, max_requests: int, max_seconds: float,
             endpoint: str = "/classify", samples: int = 1, timeout_s: float = 60.0, seed: int = 0) -> LoadResult:
    """Drive ``url`` with ``concurrency`` requests in flight until ``max_requests`` were sent or ``max_seconds``
    passed (requests then in flight finish or time out). Each request posts the next payload (a seeded shuffle)
    as the ``image`` file field of ``endpoint``."""
    if concurrency < 1 or max_requests < 1 or max_seconds <= 0:
        raise AtopError("load: concurrency and max_requests must be >= 1 and max_seconds > 0")
    if not payloads:
        raise AtopError("load: no images to send")
    url = check_local(url)
    return asyncio.run(_drive(url, list(payloads), concurrency, max_requests, max_seconds, endpoint, samples,
                              timeout_s, seed))


async def _drive(url, payloads, concurrency, max_requests, max_seconds, endpoint, samples, timeout_s, seed) -> LoadResult:
    # aiohttp, not httpx: on 2 cores httpx's client took a whole core at 128 connections (50 requests/s, the
    # server 40 % busy), so it measured itself; aiohttp's costs a fraction of that per request
    import aiohttp

    order = list(range(len(payloads)))
    random.Random(seed).shuffle(order)
    # the multipart bodies are encoded once, before the clock starts: the client shares the CPU with the server
    boundary = "atop-loadgen-" + "".join(random.Random(seed).choices("0123456789abcdef", k=24))
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    bodies = [multipart_body(boundary, p, samples) for p in payloads]
    records: list[_Record] = []
    first_errors: list[str] = []
    issued = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    deadline = t0 + max_seconds
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, trust_env=False) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                i = order[issued % len(order)]
                p = payloads[i]
                issued += 1
                start = time.perf_counter()
                error, detail, predicted = None, "", None
                try:
                    async with client.post(endpoint, data=bodies[i], headers=headers) as r:
                        body = await r.read()
                    if r.status != 200:
                        error, detail = f"HTTP {r.status}", body[:200].decode(errors="replace")
                    elif endpoint == "/classify":
                        try:
                            predicted = int(json.loads(body)["class_id"])
                        except (ValueError, KeyError, TypeError):
                            error, detail = "bad answer body", body[:200].decode(errors="replace")
                except asyncio.TimeoutError:
                    error, detail = "timeout", f"no answer within {timeout_s:g} s"
                except aiohttp.ClientConnectorError as e:
                    error, detail = "ConnectError", str(e)[:200]
                except aiohttp.ClientError as e:  # other transport errors: reset, disconnected, protocol
                    error, detail = type(e).__name__, str(e)[:200]
                if error and len(first_errors) < 5:
                    first_errors.append(f"{error}: {detail}")
                records.append(_Record(start - t0, time.perf_counter() - start, error, p.label, predicted))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = [r for r in records if r.error is None]
    kinds: dict[str, int] = {}
    for r in records:
        if r.error:
            kinds[r.error] = kinds.get(r.error, 0) + 1
    labelled = [r for r in ok if r.label is not None and r.predicted is not None]
    return LoadResult(
        url=url, endpoint=endpoint, concurrency=concurrency, samples=samples, sent=len(records), ok=len(ok),
        errors=len(records) - len(ok), error_kinds=kinds, wall_s=round(wall, 3),
        requests_per_s=round(len(ok) / wall, 2) if wall > 0 else 0.0,
        latency_ok=latency_summary([r.seconds for r in ok]), latency_all=latency_summary([r.seconds for r in records]),
        accuracy=round(sum(r.label == r.predicted for r in labelled) / len(labelled), 4) if labelled else None,
        stopped_by="requests" if len(records) >= max_requests else "time", first_errors=first_errors,
        client_cpu=round(cpu / wall, 3) if wall > 0 else 0.0)


def multipart_body(boundary: str, payload: Payload, samples: int) -> bytes:
    """The /classify form of one image: the ``image`` file field and an explicit ``samples`` (a server's default K
    is the model card's), as multipart/form-data with ``boundary`` (RFC 7578)."""
    name = payload.name.replace('"', "%22").replace("\r", "").replace("\n", "")
    return b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: {payload.mime}\r\n\r\n".encode(), payload.data,
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="samples"\r\n\r\n{samples}\r\n'
        f"--{boundary}--\r\n".encode()])


# ------------------------------------------------------------------------------------------ CPU of a process tree
def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, seconds) used so far by ``pid`` and every living descendant (Linux /proc), e.g. a
    `bentoml serve` and its workers; None where /proc cannot be read. Measure a span as the difference of two calls
    (a process that exits in between takes its time with it)."""
    hz = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for e in entries:
        try:
            fields = Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parents[int(e)] = int(fields[1])
        times[int(e)] = (int(fields[11]) + int(fields[12])) / hz
    if pid not in times:
        return None
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return sum(times[p] for p in tree)



_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def server_metrics(url: str, endpoint: str = "/classify") -> dict[str, float] | None:
    """Cumulative counters from the server's Prometheus /metrics (summed over its workers): time and count of
    ``endpoint`` requests, and of the batcher's model calls: their rows, their time, and how long their oldest
    row had queued (atop_serve/batcher.py). None if they cannot be read."""
    import httpx

    try:
        text = httpx.get(check_local(url) + "/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return None
    out = dict.fromkeys(("request_s", "requests", "call_s", "calls", "queue_s", "batch_rows"), 0.0)
    names = {"bentoml_service_request_duration_seconds_sum": "request_s",
             "bentoml_service_request_duration_seconds_count": "requests",
             "atop_model_call_seconds_sum": "call_s", "atop_model_call_seconds_count": "calls",
             "atop_model_queue_seconds_sum": "queue_s", "atop_model_batch_rows_sum": "batch_rows"}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in names:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        if m.group(1).startswith("bentoml_") and labels.get("endpoint") != endpoint:
            continue
        try:
            out[names[m.group(1)]] += float(m.group(3))
        except ValueError:
            continue
    return out


def metrics_delta(before: dict | None, after: dict | None) -> dict | None:
    """What the server did between two ``server_metrics`` readings: mean request time, model calls, rows per call,
    mean time of a model call and mean time its oldest row queued for it."""
    if not before or not after:
        return None
    d = {k: after[k] - before[k] for k in after}
    mean = lambda s, n: round(1000 * d[s] / d[n], 2) if d[n] else None  # noqa: E731
    return {"requests": int(d["requests"]), "request_mean_ms": mean("request_s", "requests"),
            "call_mean_ms": mean("call_s", "calls"), "queue_mean_ms": mean("queue_s", "calls"),
            "model_calls": int(d["calls"]), "rows": int(d["batch_rows"]),
            "rows_per_call": round(d["batch_rows"] / d["calls"], 2) if d["calls"] else None,
            "model_seconds": round(d["call_s"], 3)}


# ------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path
    startup_s: float
    pid: int

    def post(self, path: str, **kw):
        import httpx

        return httpx.post(self.url + path, timeout=60, **kw)

    def get(self, path: str, **kw):
        import httpx

        return httpx.get(self.url + path, timeout=60, **kw)


@contextmanager
def serve(model: str | Path, env: dict | None = None, port: int | None = None, log: Path | None = None,
          ready_timeout_s: float = 60.0) -> Iterator[Server]:
    """Run ``bentoml serve`` (from the repo root, where bentofile.yaml names the service) on 127.0.0.1 for
    ``ATOP_MODEL=model``, wait until /readyz answers 200, yield it, then stop the whole process group (SIGTERM,
    then SIGKILL). ``env`` adds variables to this process's environment minus every ``ATOP_*`` one. AtopError
    (with the end of the server log) if it exits or is not ready in time."""
    import httpx

    port = port or free_port()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ATOP_")}
    run_env.update({"ATOP_MODEL": str(model), "BENTOML_DO_NOT_TRACK": "True", **(env or {})})
    own_log = log is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="atop-serve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise AtopError(f"bentoml serve exited with status {proc.returncode}:\n{_tail(log)}")
            if time.perf_counter() - start > ready_timeout_s:
                raise AtopError(f"bentoml serve not ready after {ready_timeout_s:g} s:\n{_tail(log)}")
            try:
                if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield Server(url, log, time.perf_counter() - start, proc.pid)
    finally:
        stop(proc)
        if own_log:
            log.unlink(missing_ok=True)


def stop(proc: subprocess.Popen) -> None:
    """End a server started by ``serve``: its own process group (it started one), politely, then by force."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
