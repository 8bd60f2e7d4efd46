"""Read paths of the SQLite queue store (not a test).

    .venv/bin/python bench/store_reads_bench.py [--messages 2000] [--dir DIR]

Fills a queue with messages (3 recipients, 2 attempts each), then times the reads the
scheduler makes per job: `load_body` (every attempt), `get_message` (every NDR and, with
`ndr.delay_warning`, every deferral), and `next_due` (every idle round) — one caller at a
time, then 50 callers at once (the scheduler's jobs do this; the store must not fail or
mix snapshots). Prints calls per second and microseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay import log
from relay.model import Envelope
from relay.model import RecipientStatus as S
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store

T0 = 1_795_000_000.0


async def fill(store: Store, n: int) -> list[str]:
    body = b"From: bench@example.org\r\nSubject: bench\r\n\r\n" + b"x" * 5000 + b"\r\n"
    ids = list(await asyncio.gather(*(
        store.enqueue(Envelope("bench@example.org",
                               tuple(f"r{k}@d{i % 50}.example" for k in range(3)), body),
                      now=T0) for i in range(n))))
    jobs = await store.claim(now=T0, owner="b", lease_seconds=60, limit=n)
    while jobs:
        await store.record([JobResult(j.message_id, tuple(
            RecipientUpdate(r[0], S.DEFERRED, "4.4.1", "refused", next_attempt_at=T0 + 900)
            for r in j.recipients), tuple(
            AttemptTrace(r[0], at=T0, mx="mx.example", ip="192.0.2.1", code="4.4.1")
            for r in j.recipients for _ in range(2))) for j in jobs], now=T0)
        jobs = await store.claim(now=T0, owner="b", lease_seconds=60, limit=n)
    return ids


async def timed(label: str, calls: int, concurrency: int,
                fn: Callable[[int], Awaitable[Any]]) -> None:
    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            try:
                await fn(i)
            except Exception:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    took = time.perf_counter() - start
    print(f"{label:<14} x{concurrency:<3} {calls / took:9.0f}/s  {took / calls * 1e6:8.1f} us"
          f"/call  errors {errors}")


async def main(args: argparse.Namespace) -> None:
    log.configure(level="error")
    work = Path(tempfile.mkdtemp(prefix="store-reads-", dir=args.dir))
    try:
        store = await Store.open(work / "q.db")
        ids = await fill(store, args.messages)
        for concurrency in (1, 50):
            await timed("load_body", args.calls, concurrency,
                        lambda i: store.load_body(ids[i % len(ids)]))
            await timed("get_message", args.calls, concurrency,
                        lambda i: store.get_message(ids[i % len(ids)]))
            await timed("next_due", args.calls, concurrency, lambda i: store.next_due(T0))
        await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--dir", default=None, help="where the queue file goes (default: /tmp)")
    asyncio.run(main(p.parse_args()))
