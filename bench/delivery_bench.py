"""Delivery throughput with STARTTLS + DANE (3 1 1), the relay next to Postfix (not a test).

    sudo .venv/bin/python bench/delivery_bench.py [--messages 2000] [--concurrency 50]
        [--size 5120] [--repeat 1] [--no-postfix] [--no-postfix-reuse] [--profile]
        [--py-spy PATH] [--dir DIR] [--keep]

The world, all on loopback:
- a DNSSEC test bed (tests/support/dnsbed.py: NSD with a private signed root, a
  validating Unbound) with the signed zone bench.test: `MX 10 mx.bench.test`, an A record
  for mx, and `_PORT._tcp.mx.bench.test TLSA 3 1 1 <SHA-256 of the sink's key>`. The
  Unbound listens on port 53 of its own 127.x address, because Postfix (the C library's
  resolver) cannot use another port; the relay uses the same Unbound.
- one destination for everyone: bench/tlssink.c (C, OpenSSL, one thread per connection),
  STARTTLS with a generated ECDSA P-256 certificate, PIPELINING; it counts messages,
  connections, TLS handshakes and resumed sessions (`XSTAT`).

Each system gets the same N messages (5 KB payload, to to@bench.test), queued first with
delivery held, then released; the clock runs from release until the sink has N more
messages:
- relay: `relay serve` with delivery off takes the N messages (smtp-source, 50 sessions),
  stops; then starts again with delivery on (`delivery.max_connections_per_domain` =
  --concurrency). t0 = its `listening` event. CPU = utime+stime of the process.
- postfix: a private Postfix instance (bench/postfixinst.py) with
  `smtp_tls_security_level = dane`, `smtp_dns_support_level = dnssec`,
  `smtp_host_lookup = dns`, `smtp_tcp_port` = the sink's port, the session cache Debian
  configures by default (`smtp_tls_session_cache_database`), and
  `smtp_destination_concurrency_limit` = --concurrency (Postfix's slow start from
  `initial_destination_concurrency` = 5 stays). Its resolver is the bed's Unbound through
  a private /etc/resolv.conf (`nameserver IP` + `options trust-ad`) bind-mounted in a
  mount namespace of its own. Incoming mail is put on hold (`check_client_access
  static:HOLD`); t0 = `postsuper -H ALL` + `postqueue -f`. CPU = the whole instance.
- postfix+reuse: the same with `smtp_tls_connection_reuse = yes` (tlsproxy): Postfix
  keeps TLS connections open and sends several messages over each — the lever the
  relay does not have yet.

Checks (a run that fails one is marked): every message reached the sink; the relay
logged N `delivered` and its attempts were DANE-authenticated; Postfix logged N
`status=sent` and its TLS connections were "Verified" (DANE). Also shown: messages per
connection and resumed TLS sessions (from the sink), and the CPU the sink and Unbound
spent (the same kind of work for both systems, on the same two cores).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import profiling
from benchlib import (
    RelayServer,
    cpu_seconds,
    machine,
    random_addr,
    relay_config,
    require_tools,
    smtp_source,
    split_threads,
    table,
    thread_cpu,
    tool,
    vm_hwm,
    wait_for,
)
from postfixinst import PostfixInstance
from tlssink import TlsSink

from tests.support.certs import make_leaf, write_pair
from tests.support.dnsbed import DnsBed

DOMAIN = "bench.test"
MX = f"mx.{DOMAIN}"


class Bed53(DnsBed):
    """The DNSSEC bed with its validating Unbound on port 53 (for Postfix's resolver)."""

    def _allocate(self) -> None:
        fresh = not self.nsd_server[1]
        super()._allocate()
        if fresh:
            self.resolver = (self.resolver[0], 53)


@dataclass
class Result:
    system: str
    messages: int
    delivered: int
    seconds: float
    cpu: float
    sink: dict[str, int]
    sink_cpu: float
    dns_cpu: float
    memory_kb: int = 0
    checks: list[str] = field(default_factory=list)
    threads: tuple[float, float] | None = None  # relay: (event loop thread, other threads) CPU

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.delivered == self.messages and not self.checks


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.sink_host = random_addr()
        leaf = make_leaf([MX])
        cert, key = write_pair(leaf, directory=base)
        self.sink = TlsSink(base, self.sink_host, cert, key)
        self.bed = Bed53(base / "dns", nonvalidating=False)
        self.tlsa = leaf.tlsa_data(1, 1).hex()

    def start(self) -> None:
        self.sink.start()
        z = self.bed.zone(DOMAIN)
        z.add("@", "MX", f"10 {MX}.").add("mx", "A", self.sink_host)
        z.add(f"_{self.sink.port}._tcp.mx", "TLSA", f"3 1 1 {self.tlsa}")
        self.bed.start()

    def stop(self) -> None:
        self.bed.stop()
        self.sink.stop()

    @property
    def unbound_pid(self) -> int:
        assert self.bed._unbound is not None
        return self.bed._unbound.pid

    def counters(self) -> tuple[dict[str, int], float, float]:
        return self.sink.stats(), cpu_seconds(self.sink.pid), cpu_seconds(self.unbound_pid)


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def wait_sink(world: World, target: int, timeout: float) -> bool:
    return wait_for(lambda: world.sink.stats()["msgs"] >= target, timeout, 0.02)


RELAY_VARIANTS = {"relay": None, "relay-tls-only": "encrypt", "relay-plain": "none"}


def run_relay(world: World, tag: str, n: int, size: int, concurrency: int,
              profile: tuple[str, Path] | None = None, system: str = "relay") -> Result:
    """`system`: "relay" (MX + DANE), or a variant that sends bench.test through a
    `[[routes]]` entry to the sink's IP literal (no DNS): "relay-tls-only" (tls =
    "encrypt": STARTTLS, no DANE) or "relay-plain" (tls = "none")."""
    work = world.base / tag
    route_tls = RELAY_VARIANTS[system]
    routes = [] if route_tls is None else [
        {"domain": DOMAIN, "hosts": [f"{world.sink_host}:{world.sink.port}"], "tls": route_tls}]
    cfg = relay_config(work, random_addr(),
                       dns={"nameservers": [f"{world.bed.resolver[0]}:53"]},
                       delivery={"enabled": False, "port": world.sink.port,
                                 "max_connections": max(100, concurrency),
                                 "max_connections_per_domain": concurrency},
                       **({"routes": routes} if routes else {}))
    relay = RelayServer(work, cfg).start()
    try:
        load = smtp_source(relay.host, relay.port, sessions=50, messages=n, size=size,
                           rcpt=f"to@{DOMAIN}")
        queued = relay.count("received")
    finally:
        relay.stop()
    if not load.ok or queued != n:
        raise RuntimeError(f"relay took {queued}/{n}: {load.output[-300:]}")
    sink0, scpu0, dcpu0 = world.counters()
    relay.update(delivery={"enabled": True})
    relay.start()
    spy = None
    try:
        cpu0 = cpu_seconds(relay.pid)
        threads0 = thread_cpu(relay.pid)
        if profile is not None:
            spy = profiling.record(profile[0], relay.pid, 600, profile[1])
        done = wait_sink(world, sink0["msgs"] + n, timeout=max(120.0, n / 10))
        t1 = time.time()
        cpu1 = cpu_seconds(relay.pid)
        threads = split_threads(relay.pid, threads0, thread_cpu(relay.pid))
        sink1, scpu1, dcpu1 = world.counters()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        hwm = vm_hwm(relay.pid)
        wait_for(lambda: relay.count("delivered") >= n, 30, 0.1)  # the records after the 250s
        checks = _relay_checks(relay, n, done, {"relay": "dane-authenticated",
                                                "relay-tls-only": "tls",
                                                "relay-plain": "plain"}[system])
    finally:
        relay.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
    sink = _delta(sink1, sink0)
    return Result(system, n, sink["msgs"], t1 - relay.listening_at, cpu1 - cpu0, sink,
                  scpu1 - scpu0, dcpu1 - dcpu0, hwm, checks, threads)


def _relay_checks(relay: RelayServer, n: int, done: bool, expect: str) -> list[str]:
    checks = [] if done else ["timed out"]
    delivered = relay.count("delivered")
    if delivered != n:
        checks.append(f"{delivered} delivered events")
    security = collections.Counter(str(ev.get("security")) for ev in relay.events("attempt"))
    if set(security) != {expect}:
        checks.append(f"attempts: {dict(security)}")
    return checks


def postfix_main(world: World, concurrency: int, reuse: bool) -> dict[str, str]:
    main = {
        "smtpd_recipient_restrictions": "check_client_access static:HOLD, permit_mynetworks, "
                                        "reject",
        "smtp_tls_security_level": "dane",
        "smtp_dns_support_level": "dnssec",
        "smtp_host_lookup": "dns",
        "smtp_tcp_port": str(world.sink.port),
        "smtp_tls_loglevel": "1",
        "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
        "smtp_destination_concurrency_limit": str(concurrency),
        "default_process_limit": str(max(100, concurrency + 10)),
    }
    if reuse:
        main["smtp_tls_connection_reuse"] = "yes"
    return main


def run_postfix(world: World, tag: str, n: int, size: int, concurrency: int,
                reuse: bool) -> Result:
    pf = PostfixInstance(world.base / tag, (random_addr(), 0),
                         main=postfix_main(world, concurrency, reuse),
                         resolv_conf=f"nameserver {world.bed.resolver[0]}\noptions trust-ad\n")
    pf.start()
    try:
        load = smtp_source(pf.listen[0], pf.listen[1], sessions=50, messages=n, size=size,
                           rcpt=f"to@{DOMAIN}")
        if not load.ok or not wait_for(lambda: pf.queued("hold") >= n, 60, 0.1):
            raise RuntimeError(f"postfix held {pf.queued('hold')}/{n}: {load.output[-300:]}\n"
                               f"{pf.log_tail()}")
        sink0, scpu0, dcpu0 = world.counters()
        cpu0 = pf.cpu()
        t0 = time.time()
        pf.postsuper("-H", "ALL")
        pf.postqueue("-f")
        done = wait_sink(world, sink0["msgs"] + n, timeout=max(120.0, n / 10))
        t1 = time.time()
        cpu1 = pf.cpu()
        sink1, scpu1, dcpu1 = world.counters()
        mem = pf.pss()
        wait_for(lambda: pf.log_count("status=sent") >= n, 30, 0.1)
        checks = [] if done else ["timed out"]
        sent = pf.log_count("status=sent")
        verified = pf.log_count("Verified TLS connection established")
        other_tls = (pf.log_count("Untrusted TLS connection established")
                     + pf.log_count("Anonymous TLS connection established")
                     + pf.log_count("Trusted TLS connection established"))
        if sent != n:
            checks.append(f"{sent} status=sent")
        if not verified or other_tls:
            checks.append(f"TLS: {verified} verified, {other_tls} not DANE-verified")
    finally:
        pf.stop()
    sink = _delta(sink1, sink0)
    name = "postfix+reuse" if reuse else "postfix"
    return Result(name, n, sink["msgs"], t1 - t0, cpu1 - cpu0, sink, scpu1 - scpu0,
                  dcpu1 - dcpu0, mem, checks)


def describe(r: Result) -> str:
    s = r.sink
    per_conn = s["msgs"] / max(s["conns"], 1)
    per = 1000 / max(r.delivered, 1)
    split = ""
    if r.threads is not None:
        split = (f" (event loop thread {r.threads[0] * per:.2f}, other threads "
                 f"{r.threads[1] * per:.2f})")
    return (f"  {r.system:<14} {r.rate:7.0f} msg/s ({r.delivered}/{r.messages} in "
            f"{r.seconds:.2f}s), CPU {r.cpu * per:.2f} ms/msg{split}; "
            f"{s['conns']} connections ({per_conn:.1f} msg/conn), {s['tls']} TLS handshakes "
            f"({s['resumed']} resumed, {s['tls13']} TLS 1.3); sink CPU "
            f"{1000 * r.sink_cpu / max(r.delivered, 1):.2f} ms/msg, Unbound "
            f"{1000 * r.dns_cpu / max(r.delivered, 1):.3f} ms/msg"
            + (f"  CHECK FAILED: {'; '.join(r.checks)}" if r.checks else ""))


def summary(results: list[Result]) -> str:
    rows = []
    for system in (*RELAY_VARIANTS, "postfix", "postfix+reuse"):
        rs = [r for r in results if r.system == system]
        if not rs:
            continue
        med = statistics.median

        def per(x: float, r: Result) -> float:
            return 1000 * x / max(r.delivered, 1)

        rows.append([
            system, f"{med(r.rate for r in rs):.0f}",
            f"{med(per(r.cpu, r) for r in rs):.2f}",
            f"{med(r.sink['msgs'] / max(r.sink['conns'], 1) for r in rs):.1f}",
            f"{med(r.sink['resumed'] / max(r.sink['tls'], 1) for r in rs) * 100:.0f}%",
            f"{med(per(r.sink_cpu, r) for r in rs):.2f}",
            f"{med(per(r.dns_cpu, r) for r in rs):.3f}",
            f"{max(r.memory_kb for r in rs) / 1024:.0f}",
            len(rs), "yes" if all(r.ok for r in rs) else "NO",
        ])
    text = table(["system", "msg/s", "CPU ms/msg", "msg/conn", "TLS resumed", "sink ms/msg",
                  "Unbound ms/msg", "peak MiB", "runs", "checks ok"], rows)
    relay = [r.rate for r in results if r.system == "relay"]
    postfix = [r.rate for r in results if r.system == "postfix"]
    if relay and postfix:
        ratio = statistics.median(relay) / statistics.median(postfix)
        text += f"\n\nthe relay delivers {ratio:.2f}x Postfix's rate (target: >= 1.00)"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50,
                    help="outbound connections to the destination, both systems")
    ap.add_argument("--size", type=int, default=5120, help="payload bytes (smtp-source -l)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--no-postfix-reuse", action="store_true",
                    help="skip the Postfix run with smtp_tls_connection_reuse = yes")
    ap.add_argument("--variants", action="store_true",
                    help="also the relay through a route to the sink's IP: STARTTLS without "
                    "DANE (relay-tls-only) and cleartext (relay-plain), to price DNS+DANE "
                    "and TLS")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, one more relay run under py-spy")
    ap.add_argument("--py-spy", help="path of py-spy (default: PATH, /tmp/pyspy/bin/py-spy)")
    ap.add_argument("--dir", help="work directory parent (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    require_tools("smtp-source", "cc", "unbound", "nsd",
                  *(() if args.no_postfix else ("postfix", "unshare")))
    if os.geteuid() != 0:
        raise SystemExit("needs root: Unbound on port 53 (for Postfix), a private Postfix")
    base = Path(tempfile.mkdtemp(prefix="delivery-bench-", dir=args.dir))
    os.chmod(base, 0o755)
    world = World(base)
    results: list[Result] = []
    print(f"delivery benchmark {machine()}\n{args.messages} messages of {args.size} bytes, "
          f"concurrency {args.concurrency}, STARTTLS + DANE 3 1 1; work dir {base}", flush=True)
    try:
        world.start()
        if not args.no_postfix:
            ver = subprocess.run([tool("postconf"), "-d", "-h", "mail_version"],
                                 capture_output=True, text=True, check=False).stdout.strip()
            print(f"postfix {ver}; sink tlssink on {world.sink_host}:{world.sink.port}; "
                  f"Unbound {world.bed.resolver[0]}:53", flush=True)
        systems = ["relay"] + (["relay-tls-only", "relay-plain"] if args.variants else [])
        if not args.no_postfix:
            systems.append("postfix")
            if not args.no_postfix_reuse:
                systems.append("postfix+reuse")
        for rep in range(args.repeat):
            for system in systems:
                tag = f"{system}-{rep}"
                if system.startswith("relay"):
                    r = run_relay(world, tag, args.messages, args.size, args.concurrency,
                                  system=system)
                else:
                    r = run_postfix(world, tag, args.messages, args.size, args.concurrency,
                                    reuse=system == "postfix+reuse")
                results.append(r)
                print(describe(r), flush=True)
        print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(summary(results))
        if args.profile:
            spy = profiling.find_py_spy(args.py_spy)
            if spy is None:
                print("\n--profile: py-spy not found (pip install --target /tmp/pyspy py-spy)")
            else:
                out = base / "relay-profile.txt"
                r = run_relay(world, "relay-profile", args.messages, args.size,
                              args.concurrency, profile=(spy, out))
                print(f"\nprofile of a relay delivery run under py-spy ({r.rate:.0f} msg/s "
                      "while sampled):")
                print(profiling.summarize(out))
        (base / "results.json").write_text(json.dumps([r.__dict__ for r in results],
                                                      default=str, indent=1))
    finally:
        world.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
