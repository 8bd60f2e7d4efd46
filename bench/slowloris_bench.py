"""Legitimate-client greeting latency while slowloris clients hold connections (not a test).

    .venv/bin/python bench/slowloris_bench.py [--attackers 2000] [--addresses 40]
        [--seconds 60] [--drip 5] [--interval 1]

The world, on loopback: one `relay serve` (delivery off) with `allowed_networks =
["127.0.0.1/32"]` and the listener's other limits at their defaults. The attack:
`--attackers` connections spread over `--addresses` source addresses 127.0.N.1 (outside
allowed_networks), each reading its greeting and then dripping one byte of a command
line every `--drip` seconds, never finishing it; a connection that is closed (or
refused with 421) is opened again at once, so the attack keeps its pressure. The
legitimate client: Python's smtplib from 127.0.0.1 (an allowed network), once every
`--interval` seconds for `--seconds`: connect (the time to the 220 greeting is the
figure), send one message, QUIT. A greeting that is not 220, or none within 10 s, is a
failure.

Printed: how many greetings the legitimate client got and how fast (p50, p99, max of
the successes; failures listed by reply), how many attack connections were being held
open by the relay, and how many attack connections were refused or cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import smtplib
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import RelayServer, machine, relay_config, table


@dataclass
class AttackStats:
    greeted: int = 0  # 220s received
    refused: int = 0  # 421 (or anything else) at connect
    cut: int = 0  # connections the relay closed after a 220
    connect_errors: int = 0
    holding: int = 0  # connections currently past their 220 and dripping
    peak_holding: int = 0
    expected: int = 0  # attackers; `settled` is set once each has had its first answer
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def answered(self) -> None:
        if self.greeted + self.refused >= self.expected:
            self.settled.set()


@dataclass
class LegitStats:
    latencies: list[float] = field(default_factory=list)  # seconds to the 220, successes
    failures: list[str] = field(default_factory=list)
    delivered: int = 0


async def attacker(host: str, port: int, source: str, drip: float, stats: AttackStats,
                   stop: asyncio.Event) -> None:
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port,
                                                           local_addr=(source, 0))
            greeting = await asyncio.wait_for(reader.readline(), 30)
            if not greeting.startswith(b"220"):
                stats.refused += 1
                stats.answered()
                writer.close()
                await asyncio.sleep(0.05)  # the relay answered at once: try again soon
                continue
            stats.greeted += 1
            stats.answered()
            stats.holding += 1
            stats.peak_holding = max(stats.peak_holding, stats.holding)
            try:
                for ch in b"EHLO slow.example.and.so.on.and.on." * 1000:
                    if stop.is_set():
                        break
                    writer.write(bytes([ch]))
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(1024), drip)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                stats.cut += 0 if stop.is_set() else 1
            finally:
                stats.holding -= 1
        except (OSError, TimeoutError):
            stats.connect_errors += 1
            await asyncio.sleep(0.2)
        finally:
            if writer is not None:
                writer.close()


def legit_client(host: str, port: int, seconds: float, interval: float,
                 stats: LegitStats) -> None:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            client = smtplib.SMTP(host, port, local_hostname="legit.example", timeout=10,
                                  source_address=("127.0.0.1", 0))
        except smtplib.SMTPConnectError as exc:
            stats.failures.append(f"{exc.smtp_code} {exc.smtp_error[:40]!r}")
        except (OSError, smtplib.SMTPException) as exc:
            stats.failures.append(type(exc).__name__)
        else:
            stats.latencies.append(time.monotonic() - began)
            with contextlib.suppress(OSError, smtplib.SMTPException), client:
                n += 1
                refused = client.sendmail("legit@org.example", ["rcpt@dest.example"],
                                          f"Subject: legit {n}\r\n\r\nhello\r\n".encode())
                if not refused:
                    stats.delivered += 1
        time.sleep(max(0.0, interval - (time.monotonic() - began)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, relay: RelayServer) -> tuple[AttackStats, LegitStats]:
    stats = AttackStats(expected=args.attackers)
    stop = asyncio.Event()
    sources = [f"127.0.{i}.1" for i in range(1, args.addresses + 1)]
    tasks = [asyncio.create_task(attacker(relay.host, relay.port,
                                          sources[i % len(sources)], args.drip, stats, stop))
             for i in range(args.attackers)]
    # let the attack take hold (every attacker answered once) before measuring
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stats.settled.wait(), 30)
    legit = LegitStats()
    thread = threading.Thread(target=legit_client, args=(relay.host, relay.port,
                                                          args.seconds, args.interval, legit))
    thread.start()
    held: list[int] = []
    while thread.is_alive():
        held.append(stats.holding)
        await asyncio.sleep(1)
    thread.join()
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats.holding = int(statistics.median(held)) if held else 0
    return stats, legit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attackers", type=int, default=2000)
    ap.add_argument("--addresses", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--drip", type=float, default=5.0, help="seconds between dripped bytes")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between legit tries")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.attackers + 200:
        raise SystemExit(f"RLIMIT_NOFILE {hard} is too low for {args.attackers} sockets")
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cfg = relay_config(Path(tmp), "127.0.0.1")
        # the listener's own defaults (not benchlib's raised limits); only 127.0.0.1 allowed
        for key in ("max_connections", "max_connections_per_ip"):
            cfg["listener"].pop(key)
        cfg["listener"]["allowed_networks"] = ["127.0.0.1/32"]

        relay = RelayServer(Path(tmp) / "relay", cfg).start()
        try:
            began = time.monotonic()
            attack, legit = asyncio.run(run(args, relay))
            wall = time.monotonic() - began
        finally:
            relay.stop()
    tries = len(legit.latencies) + len(legit.failures)
    rows = [[
        f"{len(legit.latencies)}/{tries}",
        f"{percentile(legit.latencies, 0.5) * 1000:.0f}" if legit.latencies else "-",
        f"{percentile(legit.latencies, 0.99) * 1000:.0f}" if legit.latencies else "-",
        f"{max(legit.latencies) * 1000:.0f}" if legit.latencies else "-",
        sum(1 for v in legit.latencies if v <= 2.0),
        legit.delivered,
    ]]
    print(f"\n{args.attackers} dripping connections from {args.addresses} addresses "
          f"(one byte every {args.drip:g} s), legitimate client every {args.interval:g} s "
          f"for {args.seconds:g} s ({wall:.0f} s in all)\n")
    print(table(["legit 220", "p50 ms", "p99 ms", "max ms", "220 within 2 s", "delivered"],
                rows))
    if legit.failures:
        counts: dict[str, int] = {}
        for f in legit.failures:
            counts[f] = counts.get(f, 0) + 1
        print("legit failures: " + ", ".join(f"{n} x {k}" for k, n in counts.items()))
    print(f"attack: {attack.greeted} greeted, {attack.refused} refused at connect, "
          f"{attack.cut} cut by the relay, {attack.connect_errors} connect errors; "
          f"held open (median while measuring) {attack.holding}, peak {attack.peak_holding}")


if __name__ == "__main__":
    main()
