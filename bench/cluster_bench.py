"""Several nodes, one queue: intake and delivery of one node on SQLite, one node on
PostgreSQL and two nodes on PostgreSQL, with a destination that waits 50 ms before every
reply (delivery bound by latency, as across the Internet, not by this machine's cores),
CPU per delivered message on each backend, and the takeover time after `kill -9`.

    sudo .venv/bin/python bench/cluster_bench.py [--messages 1000] [--delay 0.05]

Needs Debian's postgresql (a private server is started in a temp folder, as the tests
do) and postfix's smtp-source (bench/README.md). Everything runs on loopback and stops
by itself. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    ROOT,
    RelayServer,
    cpu_seconds,
    machine,
    relay_config,
    require_tools,
    smtp_source,
    table,
    wait_for,
)

from tests.support.pgserver import PgServer

DOMAIN = "sink.bench.test"


class Sink:
    """bench/slowsink.py in its own process."""

    def __init__(self, ip: str, delay: float, data_delay: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "slowsink.py"), "--ip", ip, "--delay",
             str(delay), "--data-delay", str(data_delay)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "READY", line
        self.ip, self.port = ip, int(line[1])
        self.count_file = Path(f"/tmp/slowsink-{self.port}.count")

    def counts(self) -> tuple[int, int]:
        try:
            total, unique = self.count_file.read_text().split()
        except (OSError, ValueError):
            return 0, 0
        return int(total), int(unique)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


def node_config(work: Path, name: str, sink: Sink, url: str | None, *,
                delivery: bool, concurrency: int, lease: float = 30.0) -> dict[str, Any]:
    queue: dict[str, Any] = {"path": str(work / "queue" / "relay.db")}
    if url:
        queue.update(url=url, node=name)
    return relay_config(
        work, "127.0.0.1", queue=queue,
        dns={"require_validating_resolver": False, "nameservers": ["127.0.0.1:9"]},
        delivery={"enabled": delivery, "poll_interval": "0.2s",
                  "max_connections_per_domain": concurrency, "lease": f"{lease}s",
                  "helo_name": f"{name}.bench.test"},
        routes=[{"domain": DOMAIN, "hosts": [f"{sink.ip}:{sink.port}"], "tls": "none"}],
    )


def run(label: str, work: Path, sink: Sink, url: str | None, nodes: int, messages: int,
        concurrency: int) -> list[Any]:
    """Intake with delivery held, then delivery by every node; returns a table row."""
    servers = [RelayServer(work / f"{label}-{i}", node_config(
        work / f"{label}-{i}", f"n{i}", sink, url, delivery=False, concurrency=concurrency))
        for i in range(nodes)]
    share = messages // nodes
    for s in servers:
        s.start()
    began = time.monotonic()
    runs = [subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, 'bench'); from benchlib import smtp_source as s; "
        f"r = s('127.0.0.1', {s.port}, sessions=20, messages={share}, size=5120, "
        f"rcpt='to@{DOMAIN}'); sys.exit(r.returncode)")], cwd=ROOT) for s in servers]
    codes = [p.wait(600) for p in runs]
    intake_secs = time.monotonic() - began
    assert codes == [0] * nodes, codes
    for s in servers:
        s.stop()
    base = sink.counts()[1]
    for s in servers:
        s.update(delivery={"enabled": True})
        s.start()
    cpu0 = [cpu_seconds(s.pid) for s in servers]
    began = time.monotonic()
    done = wait_for(lambda: sink.counts()[1] - base >= share * nodes, 900, 0.2)
    secs = time.monotonic() - began
    cpu = sum(cpu_seconds(s.pid) - c for s, c in zip(servers, cpu0, strict=True))
    for s in servers:
        s.stop()
    n = share * nodes
    assert done, f"{label}: only {sink.counts()[1] - base} of {n} delivered"
    return [label, n, f"{n / intake_secs:.0f}", f"{n / secs:.0f}", f"{cpu / n * 1000:.2f}"]


def takeover(work: Path, url: str, sink: Sink) -> tuple[float, int, int]:
    """kill -9 one of two delivering nodes while it holds transactions open: seconds from
    the kill to the other node's first takeover, duplicates, messages lost."""
    lease = 30.0
    a, b = (RelayServer(work / f"takeover-{n}", node_config(
        work / f"takeover-{n}", n, sink, url, delivery=False, concurrency=10, lease=lease))
        for n in ("a", "b"))
    a.start()
    r = smtp_source("127.0.0.1", a.port, sessions=10, messages=200, size=5120,
                    rcpt=f"to@{DOMAIN}")
    assert r.ok, r.output
    a.stop()
    total0, unique0 = sink.counts()
    a.update(delivery={"enabled": True})
    b.update(delivery={"enabled": True})
    a.start()
    wait_for(lambda: a.count("delivered") >= 20, 120)
    b.start()
    os.kill(a.pid, signal.SIGKILL)
    killed = time.time()
    ok = wait_for(lambda: b.count("takeover") > 0, lease + 30, 0.05)
    first = min(_ts(e["ts"]) for e in b.events("takeover")) if ok else float("nan")
    wait_for(lambda: sink.counts()[1] - unique0 >= 200, 300, 0.2)
    b.stop()
    total, unique = sink.counts()
    return first - killed, (total - total0) - (unique - unique0), 200 - (unique - unique0)


def _ts(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--delay", type=float, default=0.05, help="destination delay per reply")
    ap.add_argument("--concurrency", type=int, default=20, help="sessions per node")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    require_tools("smtp-source")
    work = args.dir or Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    os.chmod(work, 0o755)
    print(machine())
    sink = Sink("127.77.0.1", args.delay)
    pg = PgServer(work)
    pg.start()
    try:
        rows = [
            run("1 node, SQLite", work, sink, None, 1, args.messages, args.concurrency),
            run("1 node, PostgreSQL", work, sink, pg.create_db("bench1"), 1, args.messages,
                args.concurrency),
            run("2 nodes, PostgreSQL", work, sink, pg.create_db("bench2"), 2, args.messages,
                args.concurrency),
        ]
        print(f"\n{args.messages} messages of 5 KB; destination +{args.delay * 1000:.0f} ms "
              f"per reply; {args.concurrency} sessions per node")
        print(table(["setup", "messages", "intake msg/s", "delivered msg/s",
                     "CPU ms/delivered msg"], rows))
        held = Sink("127.77.0.2", args.delay, data_delay=2.0)
        try:
            secs, dups, lost = takeover(work, pg.create_db("bench3"), held)
        finally:
            held.stop()
        print(f"\ntakeover after kill -9 (lease 30 s, poll 0.2 s): {secs:.1f} s; "
              f"delivered twice: {dups}; lost: {lost}")
    finally:
        pg.destroy()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
