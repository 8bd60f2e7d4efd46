"""Head-of-line blocking (not a test): new mail during a retry wave to dead and slow sites.

    .venv/bin/python bench/hol_bench.py [--backlog 100000] [--domains 500]
        [--slow-share 0.5] [--slow-delay 20] [--fresh 300] [--rate 5] [--dir DIR]

The world, all on loopback, no root needed:
- **dead** destinations (`dNNN.dead.test`, through one `[[routes]]` entry): a listening
  socket whose accept queue is full and never drained, so the kernel drops every SYN —
  a connection attempt waits for `delivery.connect_timeout` (30 s by default), like a
  firewalled or vanished host;
- **slow** destinations (`dNNN.slow.test`): Postfix's `smtp-sink -w DELAY`, which
  accepts everything but waits `--slow-delay` seconds before its reply to DATA (an
  overloaded or tarpitting server);
- the **healthy** destination (`new.test`): a plain `smtp-sink`.

A queue of `--backlog` deferred recipients (one message each, spread over `--domains`
domains, `--slow-share` of them slow, the rest dead) is built with the store and made
due at once; then `relay serve` starts (default delivery settings: 100 connections, 10
per domain, 30 s connect timeout; retry schedule 1 h, so a deferred recipient leaves
the wave) and `--fresh` new messages to new.test arrive at `--rate` per second through
SMTP. Measured from the relay's log: for the new mail, `received` → `delivered`
(median, p95, p99, max; mail not delivered within `--patience` s counts as missing);
for the wave, how many recipients were deferred or delivered meanwhile, and the
connections the dead sites cost (`attempt` events). CPU of the relay over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import RelayServer, cpu_seconds, machine, random_addr, relay_config, tool

from relay import log
from relay.model import Envelope
from relay.store import Store
from tests.support.dnsprocs import free_port

SENDER = "alice@senderbox.test"


def ts(ev: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(ev["ts"]).replace("Z", "+00:00")).timestamp()


class Blackhole:
    """A listener whose accept queue is full: every further SYN is dropped."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fill: list[socket.socket] = []
        for _ in range(2):  # one completes the handshake and fills the queue
            c = socket.socket()
            c.settimeout(0.5)
            with contextlib.suppress(OSError):
                c.connect((ip, self.port))
            self.fill.append(c)
        probe = socket.socket()
        probe.settimeout(1.0)
        try:
            probe.connect((ip, self.port))
            raise RuntimeError("the blackhole accepted a connection")
        except TimeoutError:
            pass
        finally:
            probe.close()

    def close(self) -> None:
        for c in self.fill:
            c.close()
        self.sock.close()


class Sink:
    """Postfix's smtp-sink on its own address; `delay` seconds before the DATA reply."""

    def __init__(self, ip: str, delay: float = 0.0) -> None:
        self.ip = ip
        self.port = free_port(ip)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        cmd = [tool("smtp-sink"), *user, "-c", "-m", "5000"]
        if delay:
            cmd += ["-w", str(int(delay))]
        self.proc = subprocess.Popen([*cmd, f"{ip}:{self.port}", "5000"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((ip, self.port), 1):
                return
            time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def is_slow(d: int, share: float) -> bool:
    """Slow and dead domains interleaved evenly (`share` of them slow)."""
    return int((d + 1) * share) > int(d * share)


async def build_backlog(db: Path, n: int, domains: int, share: float) -> None:
    """`n` deferred recipients, due now, one message each, over `domains` domains."""
    log.configure(level="error")
    store = await Store.open(db)
    body = b"Subject: old\r\n\r\n" + b"x" * 1000 + b"\r\n"
    now = time.time()

    def rcpt(i: int) -> str:
        d = i % domains
        return f"o{i}@d{d}.{'slow' if is_slow(d, share) else 'dead'}.test"

    for start in range(0, n, 5000):
        await asyncio.gather(*(store.enqueue(Envelope(SENDER, (rcpt(i),), body), now=now)
                               for i in range(start, min(n, start + 5000))))
    await store.close()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
        conn.execute("UPDATE recipients SET status = 'deferred', attempts = 1, "
                     "code = '4.4.1', reply = 'connection timed out', "
                     "next_attempt_at = ?, warned_at = updated_at", (now - 1,))
        conn.commit()


class Tail:
    """Reads the relay's growing JSON log incrementally: arrival and delivery times of the
    new mail, and counts of what happened to the wave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.received: dict[str, float] = {}
        self.delivered: dict[str, float] = {}
        self.counts: collections.Counter[str] = collections.Counter()

    def read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        for line in chunk[:cut].splitlines():
            with contextlib.suppress(ValueError):
                self._event(json.loads(line))

    def _event(self, e: dict[str, Any]) -> None:
        name = str(e.get("event"))
        dom = str(e.get("domain", ""))
        kind = ("dead" if dom.endswith(".dead.test") else "slow" if dom.endswith(".slow.test")
                else "new" if dom == "new.test" else "")
        if name == "received":
            self.received[e["id"]] = ts(e)
        elif name == "delivered" and kind == "new":
            self.delivered[e["id"]] = ts(e)
        if name in ("deferred", "delivered", "expired", "bounced") and kind:
            self.counts[f"{kind} {name}"] += 1
        elif name == "attempt" and kind == "dead" and e.get("ip"):
            self.counts["connections tried to dead sites"] += 1
        elif name.startswith("destination_") or name in ("internal_error", "storage_error"):
            self.counts[name] += 1


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p * (len(values) - 1)))]


def main(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop what we started, as ^C
    work = Path(tempfile.mkdtemp(prefix="hol-bench-", dir=args.dir))
    slow_domains = sum(is_slow(d, args.slow_share) for d in range(args.domains))
    hole = Blackhole(random_addr())
    healthy = Sink(random_addr())
    slow = Sink(random_addr(), delay=args.slow_delay)
    print(f"HOL benchmark {machine()}", flush=True)
    print(f"backlog {args.backlog} deferred recipients over {args.domains} domains "
          f"({slow_domains} slow: DATA reply after {args.slow_delay:g}s; "
          f"{args.domains - slow_domains} dead: SYNs dropped); new mail {args.fresh} "
          f"messages at {args.rate:g}/s; work dir {work}", flush=True)
    try:
        db = work / "queue" / "relay.db"
        t = time.monotonic()
        asyncio.run(build_backlog(db, args.backlog, args.domains, args.slow_share))
        print(f"backlog built in {time.monotonic() - t:.1f}s", flush=True)
        delivery: dict[str, Any] = {"enabled": True, "retry_schedule": ["1h"],
                                    "max_lifetime": "2d", **dict(args.set or [])}
        cfg = relay_config(
            work, random_addr(), delivery=delivery,
            dns={"require_validating_resolver": False, "nameservers": ["127.0.0.1:9"]},
            routes=[
                {"domain": ".dead.test", "hosts": [f"{hole.sock.getsockname()[0]}:"
                                                   f"{hole.port}"], "tls": "none"},
                {"domain": ".slow.test", "hosts": [f"{slow.ip}:{slow.port}"], "tls": "none"},
                {"domain": "new.test", "hosts": [f"{healthy.ip}:{healthy.port}"],
                 "tls": "none"}])
        relay = RelayServer(work, cfg)
        relay.start(timeout=120)
        try:
            cpu0 = cpu_seconds(relay.pid)
            t0 = time.time()
            time.sleep(args.warmup)  # the wave is under way
            import smtplib

            for i in range(args.fresh):
                due = t0 + args.warmup + i / args.rate
                time.sleep(max(0.0, due - time.time()))
                with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
                    client.sendmail(SENDER, [f"n{i}@new.test"], b"Subject: new\r\n\r\nhi\r\n")
            sent_at = time.time()
            deadline = time.monotonic() + args.patience
            tail = Tail(relay.log_path)
            while time.monotonic() < deadline:
                tail.read()
                if len(tail.received) >= args.fresh and set(tail.received) <= set(
                        tail.delivered):
                    break
                time.sleep(0.5)
            t1 = time.time()
            cpu = cpu_seconds(relay.pid) - cpu0
            tail.read()
            received, delivered = tail.received, tail.delivered
        finally:
            relay.stop()
    finally:
        hole.close()
        healthy.stop()
        slow.stop()
    lags = sorted(delivered[i] - received[i] for i in received if i in delivered)
    print(f"\nrun: {t1 - t0:.0f}s (new mail sent over {sent_at - t0 - args.warmup:.0f}s after "
          f"a {args.warmup:g}s head start of the wave); relay CPU {cpu:.1f}s "
          f"({100 * cpu / (t1 - t0):.0f}% of a core); load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("wave: " + ", ".join(f"{k} {v}" for k, v in sorted(tail.counts.items())))
    missing = len(received) - len(lags)
    if lags:
        print(f"new mail: {len(lags)}/{len(received)} delivered; received -> delivered "
              f"median {statistics.median(lags):.3f}s, p95 {percentile(lags, 0.95):.3f}s, "
              f"p99 {percentile(lags, 0.99):.3f}s, max {lags[-1]:.3f}s "
              f"(target: p99 <= 2 s)")
    print(f"new mail not delivered within {args.patience:.0f}s of the last one sent: "
          f"{missing}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _kv(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, int(value)
    except ValueError:
        return key, value


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--domains", type=int, default=500)
    p.add_argument("--slow-share", type=float, default=0.5)
    p.add_argument("--slow-delay", type=float, default=20.0,
                   help="seconds the slow sites wait before the reply to DATA")
    p.add_argument("--fresh", type=int, default=300)
    p.add_argument("--rate", type=float, default=5.0, help="new messages per second")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds the wave runs before the first new message")
    p.add_argument("--patience", type=float, default=120.0)
    p.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help="a [delivery] setting for the relay, e.g. connect_timeout=30s")
    p.add_argument("--dir", default=None, help="where the queue goes (default: /tmp)")
    p.add_argument("--keep", action="store_true")
    main(p.parse_args())
