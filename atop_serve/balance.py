"""Keep-alive connections spread over the serving workers. No BentoML import.

The workers share one listening socket, and the first to wake accepts every connection pending at that moment: a
client that opens its pool of keep-alive connections at once (a load generator, a proxy's upstream pool) can land
them all in one worker, which then does all the work while the other idles (measured: 347 requests/s at
concurrency 32 with one worker busy, against 546 with both: docs/reports/http-imbalance/report.md). ``ConnectionBalance`` (ASGI
middleware) publishes each worker's requests in flight in a small shared file; a worker carrying clearly more
than its share answers with ``Connection: close``, and the client's next connection goes to whichever worker accepts
it first, usually one with time to spare. Each worker writes only its own slot, so no lock is needed.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

SLOTS = 64  # workers a share file can hold


class LoadShare:
    """Requests in flight per worker, in a file every worker of one server maps (``path``); this one is ``index``
    (0-based) of ``workers``."""

    def __init__(self, path: Path, index: int, workers: int):
        if not 0 <= index < min(workers, SLOTS):
            raise ValueError(f"worker index {index} outside 0..{min(workers, SLOTS) - 1}")
        self.index, self.workers = index, workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * 8:
                os.ftruncate(fd, SLOTS * 8)
            self._map = mmap.mmap(fd, SLOTS * 8)
        finally:
            os.close(fd)
        self.counts = np.ndarray((SLOTS,), np.int64, buffer=self._map)
        self.counts[index] = 0  # a restarted worker starts clean

    def enter(self) -> None:
        self.counts[self.index] += 1

    def leave(self) -> None:
        self.counts[self.index] -= 1

    def overloaded(self) -> bool:
        """This worker carries clearly more than its share of the requests in flight (itself included)."""
        mine = int(self.counts[self.index])
        fair = int(self.counts[: self.workers].clip(min=0).sum()) / self.workers
        return mine > fair + max(2.0, 0.25 * fair)


def share_path() -> Path:
    """The share file of this server: in its Prometheus multi-process directory (one per server, removed with it)
    where BentoML set one, else beside the temp files, named by the server process (the workers' parent)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir()
    return Path(folder) / f"atop-load-{os.getppid()}.bin"


class ConnectionBalance:
    """ASGI middleware: count this worker's requests in flight; when it is overloaded relative to the other workers,
    answer with ``Connection: close`` so that the client reconnects (maybe to another worker). ``worker_index()``
    gives this process's 1-based worker number (None outside a multi-worker server: then it does nothing); the
    share file is opened on the first request, in the worker process."""

    def __init__(self, app, workers: int, worker_index: Callable[[], int | None]):
        self.app, self.workers, self.worker_index = app, workers, worker_index
        self.share: LoadShare | None = None
        self.ready = False

    def _open(self) -> None:
        self.ready = True
        index = self.worker_index()
        if self.workers > 1 and index is not None and 1 <= index <= SLOTS:
            self.share = LoadShare(share_path(), index - 1, min(self.workers, SLOTS))

    async def __call__(self, scope, receive, send):
        if not self.ready:
            self._open()
        share = self.share
        if share is None or scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def balancing_send(message):
            if message["type"] == "http.response.start" and share.overloaded():
                message = {**message, "headers": [*(message.get("headers") or []), (b"connection", b"close")]}
            await send(message)

        share.enter()
        try:
            await self.app(scope, receive, balancing_send)
        finally:
            share.leave()
