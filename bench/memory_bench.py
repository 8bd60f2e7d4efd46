"""Peak memory of `relay serve` with N maximum-size messages in flight at once (not a test).

    .venv/bin/python bench/memory_bench.py [--concurrency 1,10,50] [--size 10240000]
        [--budget BYTES]

For each N: a fresh `relay serve` (delivery off, `listener.max_message_size` = `--size`,
default 10,240,000 bytes as shipped; `--budget` sets `listener.data_memory_limit` where
that key exists) and N smtplib clients on loopback that each send one message of
almost exactly the maximum size (76-character lines). The clients open their sessions,
send EHLO, MAIL FROM (with SIZE=) and RCPT TO, wait for each other, then all send DATA
at the same moment and their message body as soon as they get 354, so that up to N
messages are in flight together (fewer where the relay makes DATA wait for memory).

Printed per N: the relay's peak resident set (VmHWM, from /proc), its resident set once
the clients are done (VmRSS: what it keeps), the baseline before the load, and how the
final dots were answered (250 queued / 451 4.3.1 / other).
"""

from __future__ import annotations

import argparse
import smtplib
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchlib import RelayServer, machine, relay_config, table, vm_hwm


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def payload(size: int) -> bytes:
    """A message of `size` bytes (76-character lines), dot-stuffed, with the final dot."""
    head = b"From: bench@org.example\r\nTo: to@dest.example\r\nSubject: big\r\n\r\n"
    line = b"x" * 74 + b"\r\n"
    body = head + line * ((size - len(head)) // len(line))
    return body + b".\r\n"


def client(host: str, port: int, data: bytes, barrier: threading.Barrier,
           results: list[str]) -> None:
    try:
        with smtplib.SMTP(host, port, local_hostname="bench.example", timeout=600) as c:
            c.ehlo()
            c.mail("bench@org.example", [f"SIZE={len(data)}"])
            c.rcpt("to@dest.example")
            barrier.wait(120)  # every session is ready: all send DATA now
            code, _ = c.docmd("DATA")
            if code != 354:
                results.append(str(code))
                return
            c.send(data)
            code, msg = c.getreply()
            results.append(f"{code} {msg.decode(errors='replace')[:5]}")
    except (OSError, smtplib.SMTPException, threading.BrokenBarrierError) as exc:
        results.append(type(exc).__name__)


def run(n: int, size: int, budget: str | None, tmp: Path) -> list[object]:
    listener: dict[str, object] = {"max_message_size": size}
    if budget:
        listener["data_memory_limit"] = budget
    relay = RelayServer(tmp / f"relay{n}", relay_config(tmp / f"q{n}", "127.0.0.1",
                                                        listener=listener)).start()
    data = payload(size - 200)  # leave room for dot-stuffing slack and the Received: line
    try:
        time.sleep(0.5)
        base = vm_rss(relay.pid)
        barrier = threading.Barrier(n)
        results: list[str] = []
        threads = [threading.Thread(target=client, args=(relay.host, relay.port, data,
                                                          barrier, results))
                   for _ in range(n)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - began
        time.sleep(1.0)
        peak, after = vm_hwm(relay.pid), vm_rss(relay.pid)
    finally:
        relay.stop()
    counts = Counter(r[:3] for r in results)
    return [n, f"{size / 1e6:.2f} MB", f"{base / 1024:.0f}", f"{peak / 1024:.0f}",
            f"{after / 1024:.0f}", f"{(peak - base) / 1024 / n:.1f}", counts.get("250", 0),
            counts.get("451", 0), sum(v for k, v in counts.items() if k not in ("250", "451")),
            f"{seconds:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,10,50")
    ap.add_argument("--size", type=int, default=10_240_000)
    ap.add_argument("--budget", default=None, help="listener.data_memory_limit, e.g. 128MiB")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in (int(x) for x in args.concurrency.split(",")):
            rows.append(run(n, args.size, args.budget, Path(tmp)))
            print(rows[-1], flush=True)
    print()
    print(table(["N", "message", "base MiB", "peak MiB (VmHWM)", "after MiB (VmRSS)",
                 "peak-base MiB/msg", "250", "451", "other", "seconds"], rows))


if __name__ == "__main__":
    main()
