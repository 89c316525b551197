"""The serving process's continuous batcher (atop_serve/batcher.py), in process with a fake model: merging, order,
chunking, the queueing deadline, failures and cancelled requests."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from atop_serve.batcher import Overloaded, RowBatcher


class FakeModel:
    """predict_rows stand-in: row r's 'probs' are [seed, image's first pixel]; records each call's row count. A
    call can be held until released (to make requests queue behind it) or made to fail."""

    def __init__(self, seconds: float = 0.0):
        self.calls: list[int] = []
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, images, seeds, views):
        self.release.wait(10)
        time.sleep(self.seconds)
        self.calls.append(len(seeds))
        if self.fail:
            raise RuntimeError("model exploded")
        probs = np.stack([np.array(seeds, np.float32), images[:, 0, 0, 0].astype(np.float32)], 1)
        return probs, [None if v is None else f"{v}:{s}" for v, s in zip(views, seeds)]


def images(first: int, n: int) -> np.ndarray:
    x = np.zeros((n, 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(first, first + n)
    return x


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    model = FakeModel()

    async def main():
        batcher = RowBatcher(model, max_rows=8, deadline_s=10)
        model.release.clear()  # the first request's call holds the model while the others queue
        first = asyncio.ensure_future(batcher.run(images(0, 1), [100]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.run(images(10 * i, 2), [10 * i, 10 * i + 1], ["mask", None]))
                for i in range(1, 6)]
        await asyncio.sleep(0.05)
        model.release.set()
        return await first, await asyncio.gather(*rest)

    (p0, _), rest = run(main())
    assert p0.tolist() == [[100, 0]]
    for i, (probs, pictures) in enumerate(rest, start=1):
        assert probs.tolist() == [[10 * i, 10 * i], [10 * i + 1, 10 * i + 1]]  # each request gets its own rows
        assert pictures == [f"mask:{10 * i}", None]
    # 1 row alone, then the 10 queued rows in whole requests of 2, at most 8 per call: 8 + 2
    assert model.calls == [1, 8, 2]


def test_request_larger_than_max_rows_runs_in_chunks_in_order():
    model = FakeModel()
    probs, _ = run(RowBatcher(model, max_rows=4, deadline_s=10).run(images(0, 10), list(range(10))))
    assert probs[:, 0].tolist() == list(range(10)) and model.calls == [4, 4, 2]


def test_rows_past_the_deadline_are_refused_and_the_batcher_goes_on():
    model = FakeModel(seconds=0.2)

    async def main():
        batcher = RowBatcher(model, max_rows=4, deadline_s=0.05)
        busy = asyncio.ensure_future(batcher.run(images(0, 1), [1]))
        await asyncio.sleep(0.02)  # the model is busy for 0.2 s: this one waits past the deadline
        with pytest.raises(Overloaded, match="overloaded"):
            await batcher.run(images(0, 1), [2])
        await busy
        return await batcher.run(images(5, 1), [3])  # an idle batcher serves at once again

    probs, _ = run(main())
    assert probs.tolist() == [[3, 5]] and model.calls == [1, 1]


def test_model_failure_fails_its_requests_only():
    model = FakeModel()

    async def main():
        batcher = RowBatcher(model, max_rows=4, deadline_s=10)
        model.fail = True
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.run(images(0, 2), [1, 2])
        model.fail = False
        return await batcher.run(images(0, 1), [7])

    probs, _ = run(main())
    assert probs[0, 0] == 7


def test_cancelled_request_is_not_run():
    model = FakeModel()

    async def main():
        batcher = RowBatcher(model, max_rows=4, deadline_s=10)
        model.release.clear()
        busy = asyncio.ensure_future(batcher.run(images(0, 1), [1]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.run(images(0, 3), [2, 3, 4]))  # the client goes away while queued
        await asyncio.sleep(0.01)
        gone.cancel()
        kept = asyncio.ensure_future(batcher.run(images(0, 1), [5]))
        await asyncio.sleep(0.01)
        model.release.set()
        await busy
        return await kept

    probs, _ = run(main())
    assert probs[0, 0] == 5 and model.calls == [1, 1]


def test_bad_arguments():
    with pytest.raises(ValueError):
        RowBatcher(FakeModel(), max_rows=0, deadline_s=1)
    with pytest.raises(ValueError, match="seeds"):
        run(RowBatcher(FakeModel(), max_rows=2, deadline_s=1).run(images(0, 2), [1]))
