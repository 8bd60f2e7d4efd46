"""A deep queue costs nothing (issue 14, items 1, 2 and 6): not a test.

    .venv/bin/python bench/depth_bench.py [--depths 0,100000,1000000] [--backend sqlite]
        [--dir DIR] [--src DIR] [--no-full-list] [--keep]

For each depth N it builds a queue of N deferred messages (5 KB each, one recipient,
500 destination domains), then measures with real `relay serve` and `relay queue`
processes:

- **cold start**: from the `relay serve` process start to the first `220` banner, and
  to the delivery of a message sent at that moment (to a local aiosmtpd sink through a
  `[[routes]]` entry): the listener and the first delivery claim. After a clean stop
  (the normal restart), and after `kill -9` (SQLite: the integrity check then runs in the
  background; its duration is read from the `integrity_check` event);
- **idle**: CPU and RSS of `relay serve` over 20 s with nothing due, and one `/metrics`
  scrape (the queue gauges);
- **CLI**: wall time and peak RSS (`wait4` of the process) of `queue list --json
  --limit 100` (the first page), `queue stats --json`, and the whole `queue list --json`
  streamed to /dev/null;
- **retry --all**: `relay queue retry --all` while 4 smtplib clients send one message
  after another into the same relay (delivery off, so only intake competes with the
  change): its duration, and the longest time one message took to be accepted during it
  (before: one UPDATE held the write lock 3.5 to 6 s; clients got 451).

The queue is built through the store API, as intake and delivery write it: messages
with `Store.enqueue` (concurrent calls share group commits of 4096), then every
recipient is claimed and its deferral recorded with `Store.record` (status, code, reply,
next attempt in 6 h, one trace row), 2000 at a time. `--src DIR` runs another checkout
of the relay (e.g. `git worktree add /tmp/main main`) for the builder and every relay
process, to measure the code before a change on the same machine. `--backend pg` puts
the queue on a private PostgreSQL (tests/support/pgserver.py; root needed).

Disk: ~6 GB per million messages on SQLite (`df -h` first); the work folder is removed
at the end (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTHONPATH"):  # --src: its relay, not this checkout's
    sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench.benchlib import (  # noqa: E402
    RelayServer,
    cpu_seconds,
    free_port,
    machine,
    random_addr,
    relay_config,
    table,
)

SENDER = "alice@senderbox.test"
DOMAINS = 500
BODY_SIZE = 5120
BATCH = 4096

# The figures of issue 14 (before), measured with the same kind of queue.
EARLIER: dict[int, dict[str, str]] = {
    0: {"start_220": "0.4 s", "list_json_full": "0.27 s", "stats": "0.25 s"},
    100_000: {"start_220": "15 s", "list_json_full": "3.1 s", "stats": "0.48 s"},
    1_000_000: {"start_220": "167 s", "list_json_full": "44 s, 3.8 GiB", "stats": "2.6 s",
                "retry_all": "one UPDATE, lock held 3.5-6 s",
                "retry_stall": "up to 5 s, 451 replies",
                "idle": "0.2 % CPU, ~60 MiB"},
}


# --- building the queue (run in a child process: --src decides the code) -------------


def body() -> bytes:
    head = b"From: alice@senderbox.test\r\nTo: someone@fail.test\r\nSubject: depth\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return (head + line * (BODY_SIZE // len(line) + 1))[:BODY_SIZE]


async def build(target: str, n: int) -> None:
    from relay import log
    from relay.model import Envelope
    from relay.model import RecipientStatus as S
    from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store

    log.configure(level="error")
    if target.startswith("postgresql://"):
        store = await Store.open_url(target, commit_batch=BATCH)
    else:
        store = await Store.open(target, commit_batch=BATCH)
    data = body()
    now = time.time() - 3600  # received an hour ago
    began = time.monotonic()
    for start in range(0, n, BATCH):
        await asyncio.gather(*(store.enqueue(
            Envelope(SENDER, (f"o{i}@d{i % DOMAINS}.fail.test",), data), now=now)
            for i in range(start, min(n, start + BATCH))))
    enqueued = time.monotonic()
    deferred = 0
    while deferred < n:
        jobs = await store.claim(now=time.time(), owner="bench/build", lease_seconds=600,
                                 limit=2000)
        if not jobs:
            break
        at = time.time()
        await store.record([JobResult(j.message_id, tuple(
            RecipientUpdate(r[0], S.DEFERRED, "4.4.1", "connection refused",
                            next_attempt_at=at + 6 * 3600) for r in j.recipients), tuple(
            AttemptTrace(r[0], at, mx=f"mx.{j.domain}", ip="127.25.14.2", dnssec="insecure",
                         tlsa="none", code="4.4.1", reply="connection refused")
            for r in j.recipients)) for j in jobs], now=at)
        deferred += sum(len(j.recipients) for j in jobs)
    await store.close()
    print(json.dumps({"enqueue_s": round(enqueued - began, 1),
                      "defer_s": round(time.monotonic() - enqueued, 1),
                      "deferred": deferred}), flush=True)


# --- measuring -------------------------------------------------------------------------


def run_cli_rss(relay: RelayServer, *args: str, to_null: bool = False,
                timeout: float = 900) -> tuple[float, int, str, str]:
    """`relay <args> -c CONFIG`: (seconds, peak RSS in KiB, stdout, stderr); the child
    is reaped with wait4, which reports its own peak RSS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out = open(os.devnull, "w") if to_null else tempfile.TemporaryFile("w+")
    err = tempfile.TemporaryFile("w+")
    try:
        began = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "relay", *args, "-c",
                                 str(relay.config_path)], cwd=relay.dir, env=env,
                                stdout=out, stderr=err)
        deadline = began + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"relay {' '.join(args)} timed out")
            time.sleep(0.005)
        seconds = time.monotonic() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
        stdout = ""
        if not to_null:
            out.seek(0)
            stdout = out.read()
        if proc.returncode != 0:
            raise RuntimeError(f"relay {' '.join(args)} failed: {stderr[-2000:]}")
        return seconds, int(usage.ru_maxrss), stdout, stderr
    finally:
        out.close()
        err.close()


def median3(relay: RelayServer, *args: str) -> tuple[float, int]:
    """The median time (and the largest peak RSS) of three runs."""
    runs = [run_cli_rss(relay, *args)[:2] for _ in range(3)]
    return sorted(r[0] for r in runs)[1], max(r[1] for r in runs)


def banner(host: str, port: int, timeout: float) -> float:
    """Connect until a 220 banner is read; returns time.monotonic() at that moment."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    stamp = time.monotonic()
                    s.sendall(b"QUIT\r\n")
                    return stamp
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no 220 from {host}:{port} within {timeout}s")


def cold_start(relay: RelayServer, port: int, timeout: float) -> tuple[float, float]:
    """(seconds to the first 220, seconds to the delivery of a message sent then)."""
    relay.update(listener={"port": port})
    relay.config_path.write_text(_toml(relay.config), encoding="utf-8")
    began = time.monotonic()
    relay.start(timeout=timeout)
    first = banner(relay.host, port, timeout)
    with smtplib.SMTP(relay.host, port, timeout=30) as c:
        c.sendmail(SENDER, ["first@ok.sink.test"], b"Subject: first\r\n\r\nhello\r\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("recipient") == "first@ok.sink.test" for e in relay.events("delivered")):
            return first - began, time.monotonic() - began
        time.sleep(0.02)
    raise RuntimeError("the first message was not delivered")


def _toml(config: dict[str, Any]) -> str:
    from tests.support.relayproc import toml_dumps

    return toml_dumps(config)


class Senders:
    """`n` smtplib clients, each sending one message after another; records (start,
    seconds, ok) per message."""

    def __init__(self, host: str, port: int, n: int = 4) -> None:
        self.host, self.port, self.n = host, port, n
        self.samples: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]

    def _run(self, i: int) -> None:
        data = body()
        while not self._stop.is_set():
            try:
                with smtplib.SMTP(self.host, self.port, timeout=60) as c:
                    c.ehlo("bench.test")
                    while not self._stop.is_set():
                        began = time.monotonic()
                        ok = True
                        try:
                            c.sendmail(SENDER, [f"n{i}@new.sink.test"], data)
                        except smtplib.SMTPResponseException:
                            ok = False
                            c.rset()
                        self.samples.append((began, time.monotonic() - began, ok))
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    def __enter__(self) -> Senders:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(70)

    def during(self, a: float, b: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if s[0] + s[1] >= a and s[0] <= b]


def scrape(url: str) -> float:
    began = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return time.monotonic() - began


def kib(n: int) -> str:
    return f"{n / 1024:.0f} MiB"


def measure(args: argparse.Namespace, depth: int, work: Path, target: str,
            sink: Any) -> dict[str, str]:
    host = random_addr()
    port = free_port(host)
    metrics_port = free_port(host)
    queue = {"url": target} if target.startswith("postgresql://") else {"path": target}
    cfg = relay_config(work, host, queue=queue, **{
        "dns": {"require_validating_resolver": False, "nameservers": ["127.0.0.1:9"],
                "timeout": "1s"},
        "delivery": {"enabled": True, "poll_interval": "1s", "connect_timeout": "2s",
                     "retry_schedule": ["6h"], "max_lifetime": "5d"},
        "routes": [{"domain": ".fail.test", "hosts": ["127.0.0.1:9"], "tls": "none"},
                   {"domain": ".sink.test", "hosts": [f"{sink.host_ip}:{sink.port}"],
                    "tls": "none"}],
        "metrics": {"listen": f"{host}:{metrics_port}"},
        "log": {"format": "json", "level": "info"},
    })
    relay = RelayServer(work / "relay", cfg)
    got: dict[str, str] = {}
    timeout = 900.0
    # the builder stopped cleanly: a normal restart
    t220, tdel = cold_start(relay, port, timeout)
    got["start_220"] = f"{t220:.2f} s"
    got["start_delivered"] = f"{tdel:.2f} s"
    # idle
    time.sleep(5)
    cpu0, t0 = cpu_seconds(relay.pid), time.monotonic()
    time.sleep(20)
    idle_cpu = (cpu_seconds(relay.pid) - cpu0) / (time.monotonic() - t0)
    rss = _status_kib(relay.pid, "VmRSS")
    got["idle"] = f"{100 * idle_cpu:.1f} % CPU, {kib(rss)}"
    got["metrics_scrape"] = f"{scrape(f'http://{host}:{metrics_port}/metrics'):.3f} s"
    # the CLI beside the running relay
    if "--limit" in run_cli_rss(relay, "queue", "list", "--help")[2]:
        s, m = median3(relay, "queue", "list", "--json", "--limit", "100")
        got["list_first_page"] = f"{s:.2f} s, {kib(m)}"
    s, m = median3(relay, "queue", "stats", "--json")
    got["stats"] = f"{s:.2f} s, {kib(m)}"
    s, m = median3(relay, "--version")
    got["cli_floor"] = f"{s:.2f} s, {kib(m)}"
    if args.full_list:
        s, m, _, _ = run_cli_rss(relay, "queue", "list", "--json", to_null=True)
        got["list_json_full"] = f"{s:.1f} s, {kib(m)}"
    got["hwm_serve"] = kib(_status_kib(relay.pid, "VmHWM"))
    relay.stop()
    # retry --all while clients send (delivery off: intake alone competes)
    relay.update(delivery={"enabled": False})
    relay.config_path.write_text(_toml(relay.config), encoding="utf-8")
    relay.start(timeout=timeout)
    with Senders(relay.host, port) as senders:
        time.sleep(3)
        a = time.monotonic()
        s, m, out, _ = run_cli_rss(relay, "queue", "retry", "--all")
        b = time.monotonic()
        time.sleep(2)
    before = [x for x in senders.samples if x[0] < a - 0.5]
    during = senders.during(a, b)
    worst = max((x[1] for x in during), default=0.0)
    failed = sum(1 for x in during if not x[2])
    got["retry_all"] = f"{s:.1f} s, {kib(m)} ({out.strip()})"
    got["retry_stall"] = (f"max {worst * 1000:.0f} ms over {len(during)} messages, "
                          f"{failed} refused (before: max "
                          f"{max((x[1] for x in before), default=0) * 1000:.0f} ms)")
    # an unclean stop, then a start (SQLite: the check runs in the background)
    if not target.startswith("postgresql://"):
        relay.proc.kill()  # type: ignore[union-attr]
        relay.proc.wait(30)  # type: ignore[union-attr]
        t220u, _ = cold_start_plain(relay, port, timeout)
        got["start_220_unclean"] = f"{t220u:.2f} s"
        deadline = time.monotonic() + 3 * timeout
        check = None
        started = time.monotonic() + 5  # code before issue 14 checks before listening
        while time.monotonic() < deadline and check is None:
            events = relay.events("integrity_check")
            for ev in events:
                if ev.get("result") in ("ok", "damaged"):
                    check = ev
            if not events and time.monotonic() > started:
                break
            time.sleep(0.5)
        if check is not None:
            got["background_check"] = f"{check['seconds']:.1f} s ({check['result']})"
    relay.stop()
    return got


def cold_start_plain(relay: RelayServer, port: int, timeout: float) -> tuple[float, float]:
    began = time.monotonic()
    relay.start(timeout=timeout)
    return banner(relay.host, port, timeout) - began, 0.0


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


ROWS = [
    ("start_220", "cold start to the first 220 (after a clean stop)"),
    ("start_delivered", "cold start to a delivery (message sent at the first 220)"),
    ("start_220_unclean", "start to the first 220 after kill -9"),
    ("background_check", "background integrity check after kill -9 (not waited for)"),
    ("list_first_page", "queue list --json --limit 100: time, peak RSS"),
    ("list_json_full", "queue list --json (all, streamed): time, peak RSS"),
    ("stats", "queue stats --json: time, peak RSS"),
    ("cli_floor", "relay --version (the CLI's own start): time, peak RSS"),
    ("metrics_scrape", "GET /metrics (queue gauges)"),
    ("retry_all", "queue retry --all: time, peak RSS"),
    ("retry_stall", "intake during retry --all (4 clients, one message at a time)"),
    ("idle", "relay serve idle: CPU, RSS"),
    ("hwm_serve", "relay serve peak RSS (VmHWM) through the above"),
]


def main(args: argparse.Namespace) -> None:
    if args.build:
        asyncio.run(build(args.build[0], int(args.build[1])))
        return
    from tests.support.smtpd import Destination

    if args.src:
        os.environ["PYTHONPATH"] = str(Path(args.src).resolve())
    print(machine())
    print(f"code: {args.src or ROOT}; backend: {args.backend}")
    results: dict[int, dict[str, str]] = {}
    sink = Destination(random_addr(), 0, starttls=False).start()
    pg = None
    try:
        if args.backend == "pg":
            from tests.support.pgserver import PgServer

            pg_root = Path(tempfile.mkdtemp(prefix="depth-pg-", dir=args.dir))
            os.chmod(pg_root, 0o755)
            pg = PgServer(pg_root)
            pg.start()
        for depth in args.depths:
            work = Path(tempfile.mkdtemp(prefix=f"depth-{depth}-", dir=args.dir))
            try:
                if pg is not None:
                    target = pg.create_db(f"depth{depth}")
                else:
                    target = str(work / "relay" / "queue" / "relay.db")
                    Path(target).parent.mkdir(parents=True)
                env = dict(os.environ)
                began = time.monotonic()
                out = subprocess.run([sys.executable, __file__, "--build", target, str(depth)],
                                     env=env, capture_output=True, text=True, check=True,
                                     cwd=ROOT).stdout
                info = json.loads(out.strip().splitlines()[-1])
                size = ""
                if pg is None:
                    octets = sum(f.stat().st_size for f in Path(target).parent.iterdir())
                    size = f", {octets / 1e9:.1f} GB"
                print(f"depth {depth}: built in {time.monotonic() - began:.0f} s "
                      f"(enqueue {info['enqueue_s']} s, deferrals {info['defer_s']} s{size})",
                      flush=True)
                results[depth] = measure(args, depth, work, target, sink)
                print(json.dumps({"depth": depth, **results[depth]}), flush=True)
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        sink.stop()
        if pg is not None:
            pg.destroy()
    for depth, got in results.items():
        print(f"\n{depth:,} deferred messages ({args.backend})")
        earlier = EARLIER.get(depth, {})
        print(table(["", "earlier (issue 14)", "now"],
                    [(label, earlier.get(key, "-"), got.get(key, "-"))
                     for key, label in ROWS if key in got or key in earlier]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="0,100000,1000000",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--backend", choices=["sqlite", "pg"], default="sqlite")
    p.add_argument("--dir", default=None, help="where the queues go (default: /tmp)")
    p.add_argument("--src", default=None, help="another checkout of the relay to measure")
    p.add_argument("--no-full-list", dest="full_list", action="store_false",
                   help="skip the whole `queue list --json`")
    p.add_argument("--keep", action="store_true", help="keep the work folders")
    p.add_argument("--build", nargs=2, metavar=("TARGET", "N"), help=argparse.SUPPRESS)
    with contextlib.suppress(KeyboardInterrupt):
        main(p.parse_args())
