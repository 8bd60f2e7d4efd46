"""What TLS reporting costs the delivery hot path (not a test).

    .venv/bin/python bench/tlsrpt_bench.py [--jobs 2000] [--workers 50] [--dir DIR]

1. The pure part: `relay.tlsrpt.report.session_results` for one attempt (a DANE host that
   failed, then one that succeeded), in microseconds per call.
2. The store: `workers` concurrent delivery workers each recording `jobs / workers`
   finished jobs (`Store.record`, as the scheduler does), without and with the TLS-RPT
   hook's upsert submitted just before (it joins the same group commit). Prints jobs
   per second and COMMITs for both.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from relay import log
from relay.config import build
from relay.dane.policy import DomainPlan, HostAddress, HostPlan, PlanAction
from relay.delivery.trace import AttemptReport, HostAttempt
from relay.dns.resolve import Resolver
from relay.model import Envelope, RecipientStatus, TlsaRecord, TlsRequirement
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store
from relay.tlsrpt import report as rpt
from relay.tlsrpt.reporter import TlsReporter

REC = TlsaRecord(3, 1, 1, bytes(32))


def sample() -> tuple[DomainPlan, tuple[HostAttempt, ...]]:
    hosts = tuple(HostPlan(f"mx{i}.example.com", 10 * i, 25, (HostAddress("192.0.2.1", True),),
                           True, f"mx{i}.example.com", (f"mx{i}.example.com",),
                           f"mx{i}.example.com", (REC,), (REC,), TlsRequirement.DANE, None, "",
                           (f"mx{i}.example.com",)) for i in (1, 2))
    plan = DomainPlan("example.com", PlanAction.DELIVER, None, "", hosts)
    tried = (HostAttempt("mx1.example.com", "192.0.2.1", "secure", "", security="failed",
                         failure_type="tlsa-invalid", dane="failed: no match",
                         local_ip="198.51.100.1"),
             HostAttempt("mx2.example.com", "192.0.2.2", "secure", "",
                         security="dane-authenticated", local_ip="198.51.100.1"))
    return plan, tried


def bench_pure(n: int = 20000) -> float:
    plan, tried = sample()
    t0 = time.perf_counter()
    for _ in range(n):
        rpt.session_results("example.com", plan, tried)
    return (time.perf_counter() - t0) / n * 1e6


async def bench_store(path: Path, *, jobs: int, workers: int, tlsrpt: bool
                      ) -> tuple[float, int]:
    store = await Store.open(path)
    plan, tried = sample()
    try:
        ids = [await store.enqueue(Envelope("a@x.test", (f"b{i}@example.com",), b"x\r\n"),
                                   now=1.0) for i in range(jobs)]
        claimed = []
        while len(claimed) < len(ids):
            claimed += await store.claim(now=2.0, owner="bench", lease_seconds=600, limit=500)
        queue = list(claimed)
        start_commits = store.commits
        reporter = TlsReporter(store, Resolver([("127.0.0.1", 9)]),
                               build({"tlsrpt": {"enabled": True}}, source="bench"),
                               hostname="relay.test")
        attempt = AttemptReport({}, tried, plan)

        async def worker() -> None:
            while queue:
                job = queue.pop()
                rid = job.recipients[0][0]
                result = JobResult(job.message_id, (RecipientUpdate(
                    rid, RecipientStatus.DELIVERED, "2.0.0", "250 ok", attempts=1),),
                    (AttemptTrace(rid, at=3.0, mx="mx2.example.com", ip="192.0.2.2"),))
                if tlsrpt:  # the scheduler's hook
                    reporter.record("example.com", attempt, 3.0)
                await store.record([result], now=3.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - t0
        if tlsrpt:
            [p] = await store.tlsrpt_open()
            assert sum(r.count for r in p.results) == 2 * jobs  # every session counted
        return jobs / elapsed, store.commits - start_commits
    finally:
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=50)
    ap.add_argument("--dir")
    args = ap.parse_args()
    log.configure(level="error")
    print(f"session_results: {bench_pure():.1f} µs per attempt (2 hosts)")
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="tlsrpt-bench-"))
    try:
        for flag in (False, True):
            rate, commits = asyncio.run(bench_store(base / f"q{int(flag)}.db", jobs=args.jobs,
                                                    workers=args.workers, tlsrpt=flag))
            print(f"record {'with' if flag else 'without'} TLS-RPT: {rate:7.0f} jobs/s, "
                  f"{commits} COMMITs for {args.jobs} jobs")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
