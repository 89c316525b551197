"""Continuous batching of rows inside a serving process. No torch, no BentoML.

Every endpoint turns its images into rows (one image x one purification sample, each with its own seed) and awaits
``RowBatcher.run``. One consumer task owns the model: whenever it is free it takes the rows that queued meanwhile
(whole requests, in arrival order, up to ``max_rows``) and runs them in one engine call on its own thread, so
the event loop keeps reading and decoding requests while the model computes. An idle server answers a lone
request at once (no batching window to wait out); under load the batches grow by themselves to what arrived
during the previous call. A request larger than ``max_rows`` runs alone, in chunks of ``max_rows``.

Rows still queued ``deadline_s`` after they arrived are not run: their request fails with ``Overloaded`` (the
service answers 503), so that an overloaded server sheds load instead of queueing without bound.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """A request waited longer than the queueing deadline."""


@dataclass
class _Job:
    images: np.ndarray           # uint8 (n, S, S, 3)
    seeds: Sequence[int]
    views: Sequence[str | None]
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return len(self.seeds)


@dataclass
class BatchStats:
    """What one engine call did, for metrics: rows, seconds of the call, seconds its oldest row had waited."""

    rows: int
    seconds: float
    waited: float


class RowBatcher:
    """``await batcher.run(images, seeds, views)`` -> (probs (n, C), pictures), batched with concurrent requests.

    ``predict`` is the engine's ``predict_rows(images, seeds, views)``; ``on_call`` (optional) receives a
    ``BatchStats`` after each call (metrics). Create and use it inside one event loop."""

    def __init__(self, predict: Callable, max_rows: int, deadline_s: float,
                 on_call: Callable[[BatchStats], None] | None = None):
        if max_rows < 1 or deadline_s <= 0:
            raise ValueError("max_rows must be >= 1 and deadline_s > 0")
        self.predict, self.max_rows, self.deadline_s, self.on_call = predict, max_rows, deadline_s, on_call
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="atop-model")

    async def run(self, images: np.ndarray, seeds: Sequence[int], views: Sequence[str | None] = ()):
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if not len(seeds):
            return np.zeros((0, 0), np.float32), []
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._consume(), name="atop-batcher")
        job = _Job(images, list(seeds), list(views) or [None] * len(seeds), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    def _take(self) -> list[_Job]:
        """The next call's jobs: expired ones fail, cancelled ones are dropped, then whole jobs up to max_rows."""
        now = time.perf_counter()
        taken: list[_Job] = []
        rows = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away
                self._queue.popleft()
                continue
            if now - job.arrived > self.deadline_s:
                self._queue.popleft()
                job.future.set_exception(Overloaded(
                    f"the server is overloaded: this request waited {1000 * (now - job.arrived):.0f} ms for the "
                    f"model (limit {1000 * self.deadline_s:.0f} ms); try again later"))
                continue
            if taken and rows + job.rows > self.max_rows:
                break
            taken.append(self._queue.popleft())
            rows += job.rows
        return taken

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = self._take()
            if not jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            images = np.concatenate([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images
            seeds = [s for j in jobs for s in j.seeds]
            views = [v for j in jobs for v in j.views]
            start = time.perf_counter()
            try:
                probs, pictures = await loop.run_in_executor(self._thread, self._call, images, seeds, views)
            except Exception as e:  # noqa: BLE001  (an engine failure fails these requests, not the batcher)
                log.exception("model call failed (%d rows)", len(seeds))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self.on_call is not None:
                self.on_call(BatchStats(len(seeds), time.perf_counter() - start, start - jobs[0].arrived))
            i = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result((probs[i:i + j.rows], pictures[i:i + j.rows]))
                i += j.rows

    def _call(self, images: np.ndarray, seeds: list[int], views: list[str | None]):
        """One engine call, in chunks of max_rows (only a single request larger than that needs more than one)."""
        if len(seeds) <= self.max_rows:
            probs, pictures = self.predict(images, seeds, views)
            return probs, list(pictures)
        parts = [self.predict(images[i:i + self.max_rows], seeds[i:i + self.max_rows], views[i:i + self.max_rows])
                 for i in range(0, len(seeds), self.max_rows)]
        return np.concatenate([p for p, _ in parts]), [q for _, qs in parts for q in qs]
