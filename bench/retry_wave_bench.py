"""New mail during a retry wave (not a test): how soon is it delivered?

    .venv/bin/python bench/retry_wave_bench.py [--backlog 100000] [--fresh 200] [--dir DIR]

Builds a queue of `--backlog` deferred recipients (one message each, spread over 500
destination domains that refuse connections), starts `relay serve` with
`ndr.delay_warning` on (every deferral then reads its message back, as in the run of
issue 10), makes the whole backlog due at once with `relay queue retry --all`, and sends
`--fresh` new messages to a working destination while the wave runs. Prints the wave's
length and rate and, for the new mail, the time from `received` to `delivered` (median,
95th percentile, max) and how many were not delivered within `--patience` seconds (the
fault of issue 10 left such mail claimed until its 10-minute lease ran out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relay import log  # noqa: E402
from relay.model import Envelope  # noqa: E402
from relay.store import Store  # noqa: E402
from tests.support.relayproc import start_relay  # noqa: E402
from tests.support.smtpd import Destination, shared_port  # noqa: E402

NEW_IP, FAIL_IP = "127.25.12.3", "127.25.12.2"
SENDER = "alice@senderbox.test"


def ts(ev: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(ev["ts"]).replace("Z", "+00:00")).timestamp()


async def backlog(db: Path, n: int) -> None:
    log.configure(level="error")
    store = await Store.open(db)
    body = b"Subject: old\r\n\r\n" + b"x" * 1000 + b"\r\n"
    now = time.time()
    for start in range(0, n, 5000):
        await asyncio.gather(*(store.enqueue(
            Envelope(SENDER, (f"o{i}@d{i % 500}.fail.test",), body), now=now)
            for i in range(start, min(n, start + 5000))))
    await store.close()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
        conn.execute("UPDATE recipients SET status = 'deferred', attempts = 1, "
                     "code = '4.4.1', reply = 'connection refused', "
                     "next_attempt_at = next_attempt_at + 3600, warned_at = updated_at")
        conn.commit()


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="retry-wave-", dir=args.dir))
    port = shared_port([NEW_IP, FAIL_IP])
    dest = Destination(NEW_IP, port, starttls=False).start()
    try:
        db = work / "queue" / "relay.db"
        t = time.monotonic()
        asyncio.run(backlog(db, args.backlog))
        print(f"backlog of {args.backlog} deferred recipients built in "
              f"{time.monotonic() - t:.1f}s")
        sections: dict[str, Any] = {
            "dns": {"require_validating_resolver": False},
            "delivery": {"enabled": True, "port": port, "poll_interval": "1s",
                         "connect_timeout": "2s", "retry_schedule": ["1h"],
                         "max_lifetime": "1d", "lease": "10m"},
            "ndr": {"delay_warning": "1s"},
            "routes": [{"domain": ".fail.test", "hosts": [f"{FAIL_IP}:{port}"], "tls": "none"},
                       {"domain": ".new.test", "hosts": [f"{NEW_IP}:{port}"], "tls": "none"}],
        }
        with start_relay(work, **sections) as relay:
            mark = relay.mark()
            relay.cli("queue", "retry", "--all", timeout=300)
            wave_start = time.time()
            for i in range(args.fresh):  # spread over the first part of the wave
                with relay.smtp(timeout=60) as client:
                    client.sendmail(SENDER, [f"n{i}@new.test"], b"Subject: new\r\n\r\nhi\r\n")
                time.sleep(args.spacing)
            deadline = time.monotonic() + args.patience
            received = {e["id"]: e for e in relay.events("received", after=mark)}
            while time.monotonic() < deadline:
                done = {e["id"] for e in relay.events("delivered", after=mark)} & set(received)
                if len(done) == len(received):
                    break
                time.sleep(0.5)
            delivered = {e["id"]: e for e in relay.events("delivered", after=mark)
                         if e["id"] in received}
            while len({e["id"] for e in relay.events("deferred", after=mark)}) < args.backlog:
                time.sleep(1)
            deferred = relay.events("deferred", after=mark)
            wave_end = max(ts(e) for e in deferred)
            released = len(relay.events("job_released", after=mark))
            internal = len(relay.events("internal_error", after=mark))
        lags = sorted(ts(delivered[i]) - ts(received[i]) for i in delivered)
        length = wave_end - wave_start
        print(f"wave: {args.backlog} deferrals in {length:.1f}s "
              f"({args.backlog / length:.0f}/s); internal_error {internal}; "
              f"job_released {released}")
        if lags:
            p95 = lags[int(0.95 * (len(lags) - 1))]
            print(f"new mail ({len(received)} during the wave): received -> delivered "
                  f"median {statistics.median(lags):.3f}s, p95 {p95:.3f}s, "
                  f"max {lags[-1]:.3f}s")
        print(f"new mail not delivered within {args.patience:.0f}s: "
              f"{len(received) - len(delivered)}")
    finally:
        dest.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--fresh", type=int, default=200)
    p.add_argument("--spacing", type=float, default=0.1,
                   help="seconds between new messages")
    p.add_argument("--patience", type=float, default=120.0)
    p.add_argument("--dir", default=None, help="where the queue goes (default: /tmp)")
    main(p.parse_args())
