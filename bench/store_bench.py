"""Enqueue throughput of the SQLite queue store (not a test).

    .venv/bin/python bench/store_bench.py [--seconds 3] [--dir DIR] [--size 5120]

For 1, 10 and 50 concurrent enqueuers (think: SMTP sessions), each enqueueing one
5 KB message after another, it prints messages per second and transactions committed,
with group commit (queue.commit_batch = 512) and with one COMMIT per message
(commit_batch = 1). Durability is on in both: WAL, synchronous=FULL, an fsync per
COMMIT; every enqueue returns only after its COMMIT. Use a directory on the disk the
queue would live on (not a tmpfs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from relay import log
from relay.model import Envelope
from relay.store import Store


async def run(path: Path, *, sessions: int, batch: int, seconds: float, size: int
              ) -> tuple[float, int, int]:
    store = await Store.open(path, commit_batch=batch)
    body = b"From: bench@example.org\r\nSubject: bench\r\n\r\n"
    body += (b"x" * 76 + b"\r\n") * (size // 78)
    envelope = Envelope("bench@example.org", ("rcpt@example.net",), body)
    done = 0
    deadline = time.monotonic() + seconds

    async def session() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await store.enqueue(envelope, now=time.time())
            done += 1

    start = time.monotonic()
    commits0 = store.commits
    await asyncio.gather(*(session() for _ in range(sessions)))
    elapsed = time.monotonic() - start
    commits = store.commits - commits0
    await store.close()
    return done / elapsed, commits, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--dir", help="where to put the test databases (default: a temp dir)")
    ap.add_argument("--size", type=int, default=5 * 1024, help="message size in bytes")
    args = ap.parse_args()
    log.configure(level="warning")
    base = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    print(f"store enqueue benchmark: {args.size}-byte messages, {args.seconds:g}s per run, "
          f"database in {base} ({os.cpu_count()} CPUs)")
    print(f"{'sessions':>8}  {'mode':<18}  {'msg/s':>8}  {'messages':>8}  {'commits':>8}  "
          f"{'msg/commit':>10}")
    try:
        for sessions in (1, 10, 50):
            for mode, batch in (("group commit", 512), ("commit per message", 1)):
                db = base / f"{sessions}-{batch}.db"
                rate, commits, n = asyncio.run(run(db, sessions=sessions, batch=batch,
                                                   seconds=args.seconds, size=args.size))
                print(f"{sessions:>8}  {mode:<18}  {rate:>8.0f}  {n:>8}  {commits:>8}  "
                      f"{n / max(commits, 1):>10.1f}", flush=True)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
