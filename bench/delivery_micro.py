"""What one delivery costs the relay, part by part, in CPU per message (not a test).

    sudo .venv/bin/python bench/delivery_micro.py [--messages 2000] [--concurrency 50]

Runs the relay's own code in this process (so `time.process_time()` counts every thread
of it, SQLite's included) against the same world as bench/delivery_bench.py (the DNSSEC
bed with bench.test MX + TLSA 3 1 1, the C STARTTLS sink), and prices:

- store: claim (50 at a time; the body comes with it) + the body's check + record
  (delivered + one trace row), one record per job as the scheduler does,
  `--concurrency` jobs at a time (group commit merges them); it counts thread round
  trips (the SQLite writer's and readers' threads) and commits per message;
- DNS: `plan_destination("bench.test")` with a warm cache (MX, A, TLSA);
- DANE: `relay.dane.verify` of the sink's chain against its 3 1 1 record;
- log: one `delivered` event as JSON to a file;
- SMTP sessions with `relay.smtp.client.SmtpSession`, `--concurrency` at a time, 5 KB
  messages:
  plain (connect, EHLO, MAIL/RCPT/DATA pipelined, QUIT); the same with STARTTLS, the
  second EHLO and dane.verify, as delivery.py does per new connection (its cached
  `client_context()`); the same plus TLS session resumption (a context whose wrap_bio()
  offers the last session seen for that server name); and connection reuse: one TLS
  connection per worker, 20 messages each (RSET between).
The sums tell what a delivery costs and what each lever would save.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from benchlib import machine, table
from delivery_bench import DOMAIN, MX, World

from relay import dane
from relay import log as relay_log
from relay.config import build
from relay.delivery import scheduler
from relay.delivery.destination import plan_destination
from relay.dns.resolve import Resolver
from relay.model import Envelope, RecipientStatus
from relay.smtp.client import SmtpSession, client_context
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store

BODY = b"From: a@x.test\r\nTo: to@bench.test\r\nSubject: bench\r\n\r\n" + \
    (b"x" * 76 + b"\r\n") * 66


async def cpu_of(fn: Callable[[], Awaitable[int]]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, operations) of `await fn()`."""
    c0, w0 = time.process_time(), time.perf_counter()
    n = await fn()
    return time.process_time() - c0, time.perf_counter() - w0, n


async def gather_n(n: int, concurrency: int, one: Callable[[], Awaitable[Any]]) -> int:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n


def _count_thread_hops() -> Callable[[], int]:
    """Count calls handed to worker threads (the store's writer and readers, aiosqlite
    where it is still used) from now on: each is a round trip (queue, thread wake-up,
    GIL, call_soon_threadsafe back to the loop)."""
    import concurrent.futures

    import aiosqlite.core

    original = aiosqlite.core.Connection._execute
    submit = concurrent.futures.ThreadPoolExecutor.submit
    count = 0

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return await original(self, fn, *args, **kwargs)

    def counted_submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return submit(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = counted  # type: ignore[method-assign]
    concurrent.futures.ThreadPoolExecutor.submit = counted_submit  # type: ignore[method-assign]

    def read() -> int:
        aiosqlite.core.Connection._execute = original  # type: ignore[method-assign]
        concurrent.futures.ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
        return count

    return read


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last TLS session it saw for the same server name."""

    sessions: dict[str | None, ssl.SSLSession]

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False,
                 server_hostname: Any = None, session: Any = None) -> ssl.SSLObject:
        cached = getattr(self, "sessions", {}).get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                session=session or cached)


def resuming_context() -> ResumingContext:
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sessions = {}
    return ctx


async def main_async(args: argparse.Namespace, world: World) -> list[list[str]]:
    rows: list[list[str]] = []
    n, conc = args.messages, args.concurrency
    host, port = world.sink_host, world.sink.port

    def row(name: str, cpu: float, wall: float, ops: int, note: str = "") -> None:
        rows.append([name, f"{1e3 * cpu / ops:.3f}", f"{ops / wall:.0f}", str(ops), note])
        print(f"  {name}: {1e3 * cpu / ops:.3f} ms CPU/op, {ops / wall:.0f} op/s", flush=True)

    # --- store ------------------------------------------------------------------------
    store = await Store.open(world.base / "micro" / "relay.db")
    now = time.time()
    env = Envelope("a@x.test", ("to@bench.test",), BODY)
    await asyncio.gather(*(store.enqueue(env, now=now) for _ in range(n)))

    async def store_cycle() -> int:
        """As the scheduler does it: claim (bodies come along), check the body, record
        each job's outcome as it finishes (the store merges what finishes together)."""
        done = 0
        sem = asyncio.Semaphore(conc)
        inline = getattr(scheduler, "INLINE_BODY", None)

        async def job_work(job: Any) -> None:
            async with sem:
                if inline is None:
                    await store.load_body(job.message_id)
                else:
                    await store.job_body(job)
                t = time.time()
                rid = job.recipients[0][0]
                await store.record([JobResult(job.message_id, (RecipientUpdate(
                    rid, RecipientStatus.DELIVERED, "2.0.0", "250 2.0.0 Ok", attempts=1),),
                    (AttemptTrace(rid, at=t, mx=MX, ip=host, dnssec="secure", tlsa="secure",
                                  tls="TLSv1.3", dane="3 1 1 matched", code="2.0.0",
                                  reply="250 2.0.0 Ok"),))], now=t, owner="micro")

        while done < n:
            kw = {} if inline is None else {"inline_body": inline}
            jobs = await store.claim(now=time.time(), owner="micro", lease_seconds=600,
                                     limit=50, max_recipients=100, **kw)
            if not jobs:
                break
            await asyncio.gather(*(job_work(j) for j in jobs))
            done += len(jobs)
        return done

    calls = _count_thread_hops()
    commits = store.commits
    cpu, wall, ops = await cpu_of(store_cycle)
    row("store: claim + body + record", cpu, wall, ops,
        f"{calls() / ops:.1f} thread round trips/msg, "
        f"{(store.commits - commits) / ops:.2f} commits/msg")
    await store.close()

    # --- DNS plan, DANE, log ----------------------------------------------------------
    cfg = build({"dns": {"nameservers": [f"{world.bed.resolver[0]}:53"]},
                 "delivery": {"port": port}}, source="micro")
    resolver = Resolver.from_config(cfg.dns)
    plan = await plan_destination(DOMAIN, resolver, cfg)
    assert plan.hosts and plan.hosts[0].addresses, plan

    async def plans() -> int:
        for _ in range(n):
            await plan_destination(DOMAIN, resolver, cfg)
        return n

    row("DNS: plan_destination (warm cache)", *await cpu_of(plans))

    sess = await SmtpSession.connect(host, port, helo_name="relay.bench.test")
    await sess.ehlo()
    tls = await sess.starttls(MX)
    await sess.quit()
    record = (3, 1, 1, bytes.fromhex(world.tlsa))

    async def verifies() -> int:
        at = dt.datetime.now(dt.UTC)
        for _ in range(n):
            v = dane.verify([record], tls.chain, [MX], at)
            assert v.ok
        return n

    row("DANE: dane.verify (3 1 1)", *await cpu_of(verifies))

    old = relay_log.log
    stream = _log_file(world.base / "micro-log.jsonl")
    relay_log.configure(stream=stream)

    async def logs() -> int:
        for i in range(n):
            relay_log.event("delivered", id=f"Q{i}", recipient="to@bench.test",
                            domain=DOMAIN, code="2.0.0", reply="250 2.0.0 Ok: queued as S1",
                            mx=MX)
        return n

    row("log: one event (JSON, write, flush)", *await cpu_of(logs))
    relay_log.log = old
    stream.close()

    # --- SMTP sessions ----------------------------------------------------------------
    shared = client_context("1.2")
    resuming = resuming_context()
    resumed = 0

    async def session(mode: str) -> None:
        nonlocal resumed
        s = await SmtpSession.connect(host, port, helo_name="relay.bench.test")
        await s.ehlo()
        if mode != "plain":
            ctx = resuming if mode == "resume" else shared
            info = await s.starttls(MX, context=ctx)
            dane.verify([record], info.chain, [MX], dt.datetime.now(dt.UTC))
            await s.ehlo()
        await s.send_mail("a@x.test", ["to@bench.test"], BODY)
        if mode == "resume":
            obj = s._transport.get_extra_info("ssl_object")
            if obj is not None:
                resumed += bool(obj.session_reused)
                if obj.session is not None:
                    resuming.sessions[MX] = obj.session
        await s.quit()

    for mode, label in (("plain", "SMTP plain, 1 msg/connection"),
                        ("tls", "SMTP STARTTLS + DANE check, 1 msg/connection"),
                        ("resume", "SMTP STARTTLS + DANE check + TLS session resumption")):
        resumed = 0
        cpu, wall, ops = await cpu_of(lambda m=mode: gather_n(n, conc, lambda: session(m)))
        row(label, cpu, wall, ops, f"{resumed} resumed" if mode == "resume" else "")

    per_conn = 20

    async def reuse_worker(count: int) -> None:
        s = await SmtpSession.connect(host, port, helo_name="relay.bench.test")
        await s.ehlo()
        info = await s.starttls(MX, context=shared)
        dane.verify([record], info.chain, [MX], dt.datetime.now(dt.UTC))
        await s.ehlo()
        for i in range(count):
            if i:
                await s.rset()
            await s.send_mail("a@x.test", ["to@bench.test"], BODY)
        await s.quit()

    async def reuse() -> int:
        conns = max(1, n // per_conn)
        await gather_n(conns, conc, lambda: reuse_worker(per_conn))
        return conns * per_conn

    row(f"SMTP STARTTLS + DANE check, connection reuse ({per_conn} msg/connection)",
        *await cpu_of(reuse))
    return rows


def _log_file(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--dir", help="work directory parent (default: the temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (the bed's Unbound listens on port 53)")
    base = Path(tempfile.mkdtemp(prefix="delivery-micro-", dir=args.dir))
    world = World(base)
    print(f"delivery micro-benchmark {machine()}\n{args.messages} ops each, "
          f"concurrency {args.concurrency}", flush=True)
    try:
        world.start()
        rows = asyncio.run(main_async(args, world))
    finally:
        world.stop()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(["part", "CPU ms/op", "op/s", "ops", "note"], rows))


if __name__ == "__main__":
    main()
