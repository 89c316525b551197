"""Keep-alive connections spread over the workers (atop_serve/balance.py): the shared in-flight counts and the
middleware that answers ``Connection: close`` from an overloaded worker."""
from __future__ import annotations

import asyncio

import pytest

from atop_serve import balance
from atop_serve.balance import ConnectionBalance, LoadShare


def test_share_counts_are_seen_by_every_worker(tmp_path):
    path = tmp_path / "load.bin"
    a, b = LoadShare(path, 0, 2), LoadShare(path, 1, 2)
    for _ in range(3):
        a.enter()
        b.enter()
    assert not a.overloaded() and not b.overloaded()  # 3 and 3
    for _ in range(5):
        a.enter()
    assert a.overloaded() and not b.overloaded()  # 8 against 3
    for _ in range(5):
        a.leave()
    assert not a.overloaded()
    again = LoadShare(path, 0, 2)  # a restarted worker starts from zero
    assert int(again.counts[0]) == 0 and int(b.counts[1]) == 3
    with pytest.raises(ValueError):
        LoadShare(path, 2, 2)


def answer_headers(middleware: ConnectionBalance) -> list[tuple[bytes, bytes]]:
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    middleware.app = app
    asyncio.run(middleware({"type": "http"}, receive, send))
    return sent[0]["headers"]


def test_overloaded_worker_closes_its_connections(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mine = ConnectionBalance(None, workers=2, worker_index=lambda: 1)
    assert (b"connection", b"close") not in answer_headers(mine)  # alone in flight: 1 against a fair 0.5 + 2
    other = LoadShare(balance.share_path(), 1, 2)
    for _ in range(6):
        mine.share.enter()  # six more requests in flight here, none in the other worker
    assert (b"connection", b"close") in answer_headers(mine)
    for _ in range(6):
        other.enter()  # the other worker as busy: keep the connection
    assert (b"connection", b"close") not in answer_headers(mine)
    assert int(mine.share.counts[0]) == 6  # the answered requests left the count


def test_single_worker_or_no_server_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for workers, index in ((1, 1), (2, None)):
        m = ConnectionBalance(None, workers=workers, worker_index=lambda: index)
        assert answer_headers(m) == [(b"content-type", b"text/plain")] and m.share is None
