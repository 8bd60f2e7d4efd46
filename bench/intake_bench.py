"""Intake throughput of `relay serve` next to Postfix, driven by smtp-source (not a test).

    sudo .venv/bin/python bench/intake_bench.py [--sessions 1,10,50] [--repeat 1]
        [--messages 300,3000,6000] [--size 5120] [--dir DIR] [--no-postfix]
        [--relay-delivery] [--profile] [--py-spy PATH]

For each session count, the same load is sent to each system in turn:
`smtp-source -s SESSIONS -m MESSAGES -l 5120` (5 KB of payload, one message per
connection). Measured per run: accepted messages per second (messages / wall time of
smtp-source; smtp-source stops at the first reply that is not positive, and the count is
checked against the relay's `received` events / Postfix's cleanup log), CPU seconds per
1000 messages, and memory.

Systems:
- relay: a fresh `relay serve` per run (durability on: WAL, synchronous=FULL, group
  commit), delivery off: intake alone. Memory = VmHWM of the process.
- relay+delivery (`--relay-delivery`): the same, delivering at once to smtp-sink through
  a `[[routes]]` entry (tls = "none"): the same job as the Postfix row.
- postfix: a private Postfix 3.x instance (bench/postfixinst.py) relaying everything to
  Postfix's smtp-sink (`relayhost`), defaults otherwise (it queues on disk with fsync and
  delivers while accepting). Memory = peak of the summed PSS of all its processes
  (sampled every 0.2 s); CPU = master + reaped + live children.

`--profile`: one more 50-session relay run under py-spy, summarized by area.
Everything is on loopback; each process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import profiling
from benchlib import (
    LineCounter,
    PeakSampler,
    RelayServer,
    cpu_seconds,
    cpu_tree,
    descendants,
    free_port,
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

DEFAULT_MESSAGES = {1: 300, 10: 3000, 50: 6000}


@dataclass
class Result:
    system: str
    sessions: int
    messages: int
    accepted: int
    seconds: float
    cpu: float
    memory_kb: int
    memory_kind: str
    note: str = ""
    threads: tuple[float, float] | None = None  # relay: (event loop thread, other threads) CPU
    done_seconds: float | None = None  # until every message was delivered (delivering systems)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    @property
    def end_to_end(self) -> float | None:
        return self.accepted / self.done_seconds if self.done_seconds else None


class SmtpSink:
    """Postfix's smtp-sink on a loopback address: accepts everything (PIPELINING on)."""

    def __init__(self, workdir: Path) -> None:
        self.host = random_addr()
        self.port = free_port(self.host)
        self.log = open(workdir / "smtp-sink.log", "wb")
        self.proc = subprocess.Popen([tool("smtp-sink"), "-u", "postfix",
                                      f"{self.host}:{self.port}", "1024"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: _connectable(self.host, self.port), 10):
            self.stop()
            raise RuntimeError("smtp-sink did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


def _connectable(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run_relay(base: Path, tag: str, sessions: int, messages: int, size: int,
              sink: SmtpSink | None, profile: tuple[str, Path] | None = None,
              workers: str = "1") -> Result:
    extra: dict = {}
    if workers != "1":  # intake worker processes (listener.workers)
        extra["listener"] = {"workers": int(workers) if workers.isdigit() else workers}
    if sink is not None:  # deliver to smtp-sink, like the Postfix instance does
        extra |= {"delivery": {"enabled": True, "port": sink.port},
                 "dns": {"require_validating_resolver": False},
                 "routes": [{"domain": "y.test", "hosts": [f"{sink.host}:{sink.port}"],
                             "tls": "none"}]}
    work = base / tag
    relay = RelayServer(work, relay_config(work, random_addr(), **extra)).start()
    delivered = LineCounter(relay.log_path, '"event": "delivered"')
    spy = None
    done = None
    multi = workers != "1"
    try:
        cpu0 = cpu_tree(relay.pid) if multi else cpu_seconds(relay.pid)
        threads0 = thread_cpu(relay.pid)
        if profile is not None:
            spy = profiling.record(profile[0], relay.pid, 600, profile[1])
        began = time.monotonic()
        run = smtp_source(relay.host, relay.port, sessions=sessions, messages=messages,
                          size=size)
        accepted = relay.count("received")
        if sink is not None and wait_for(lambda: delivered.count() >= accepted, 300, 0.02):
            done = time.monotonic() - began
        cpu1 = cpu_tree(relay.pid) if multi else cpu_seconds(relay.pid)
        threads = None if multi else split_threads(relay.pid, threads0,
                                                    thread_cpu(relay.pid))
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            spy.wait(30)
        # workers: the VmHWM of every process summed (shared pages counted in each)
        hwm = sum(vm_hwm(p) for p in (relay.pid, *descendants(relay.pid))) if multi \
            else vm_hwm(relay.pid)
        note = "" if run.ok else f"smtp-source exit {run.returncode}: {run.output[-200:]}"
        if sink is not None and done is None:
            note += f" only {delivered.count()} delivered"
    finally:
        relay.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
    name = "relay+delivery" if sink is not None else "relay"
    if multi:
        name += f" w={workers}"
    return Result(name, sessions, messages, accepted, run.seconds, cpu1 - cpu0, hwm,
                  "VmHWM sum" if multi else "VmHWM", note.strip(), threads, done)


def run_postfix(pf: PostfixInstance, sessions: int, messages: int, size: int) -> Result:
    wait_for(lambda: pf.queued() == 0, 120, 0.2)  # start from an empty queue
    received = LineCounter(pf.maillog, ": message-id=")
    sent = LineCounter(pf.maillog, "status=sent")
    received.count()
    sent.count()
    base_received, base_sent = received.total, sent.total
    cpu0 = pf.cpu()
    done = None
    with PeakSampler(pf.pss) as mem:
        began = time.monotonic()
        run = smtp_source(pf.listen[0], pf.listen[1], sessions=sessions, messages=messages,
                          size=size)
        if wait_for(lambda: sent.count() - base_sent >= messages, 300, 0.02):
            done = time.monotonic() - began
        cpu1 = pf.cpu()
    wait_for(lambda: received.count() - base_received >= messages, 10, 0.1)
    accepted = received.count() - base_received
    note = "" if run.ok else f"smtp-source exit {run.returncode}: {run.output[-200:]}"
    if done is None:
        note += f" only {sent.count() - base_sent} sent"
    return Result("postfix", sessions, messages, accepted, run.seconds, cpu1 - cpu0, mem.peak,
                  "PSS sum", note.strip(), None, done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1,10,50", help="comma-separated session counts")
    ap.add_argument("--messages", help="messages per run for each session count "
                    "(default 300,3000,6000)")
    ap.add_argument("--size", type=int, default=5120, help="payload bytes (smtp-source -l)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per system and session count")
    ap.add_argument("--dir", help="work directory parent (default: the temp dir; use a disk, "
                    "not a tmpfs)")
    ap.add_argument("--no-postfix", action="store_true", help="relay only")
    ap.add_argument("--relay-delivery", action="store_true",
                    help="also run the relay delivering to smtp-sink while accepting")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, one relay run at the largest session count under py-spy")
    ap.add_argument("--py-spy", help="path of py-spy (default: PATH, /tmp/pyspy/bin/py-spy)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--postfix-in-flow-delay", default="0", metavar="DELAY",
                    help="Postfix's in_flow_delay (default 0: no smtpd throttling when "
                    "cleanup lags; Postfix's own default is 1s)")
    ap.add_argument("--workers", default="1",
                    help="comma-separated listener.workers values for the relay rows "
                    "(e.g. 1,2 runs both; default 1)")
    args = ap.parse_args()

    levels = [int(x) for x in args.sessions.split(",")]
    worker_counts = [w.strip() for w in args.workers.split(",") if w.strip()]
    if args.messages:
        counts = [int(x) for x in args.messages.split(",")]
        if len(counts) != len(levels):
            ap.error("--messages needs one count per --sessions entry")
    else:
        counts = [DEFAULT_MESSAGES.get(n, 100 * n) for n in levels]
    require_tools("smtp-source", *(() if args.no_postfix else ("smtp-sink", "postfix")))
    base = Path(tempfile.mkdtemp(prefix="intake-bench-", dir=args.dir))
    os.chmod(base, 0o755)  # Postfix daemons (user postfix) must reach their queue

    print(f"intake benchmark {machine()}\n{args.size}-byte payload, one message per "
          f"connection; work dir {base}", flush=True)
    sink = pf = None
    results: list[Result] = []
    try:
        if not args.no_postfix or args.relay_delivery:
            sink = SmtpSink(base)
        if not args.no_postfix:
            assert sink is not None
            pf = PostfixInstance(base / "postfix", (random_addr(), 0),
                                 main={"relayhost": f"[{sink.host}]:{sink.port}",
                                       "in_flow_delay": args.postfix_in_flow_delay})
            pf.start()
            ver = subprocess.run([tool("postconf"), "-d", "-h", "mail_version"],
                                 capture_output=True, text=True, check=False).stdout.strip()
            print(f"postfix {ver}: private instance on {pf.listen[0]}:{pf.listen[1]}, "
                  f"relaying to smtp-sink on {sink.host}:{sink.port}, in_flow_delay = "
                  f"{args.postfix_in_flow_delay}", flush=True)
        for sessions, messages in zip(levels, counts, strict=True):
            for rep in range(args.repeat):
                systems = [(s, w) for w in worker_counts
                           for s in ["relay"] + (["relay+delivery"] if args.relay_delivery
                                                 else [])]
                systems += [("postfix", "")] if pf is not None else []
                for system, w in systems:
                    if system == "postfix":
                        assert pf is not None
                        r = run_postfix(pf, sessions, messages, args.size)
                    else:
                        r = run_relay(base, f"{system}-w{w}-{sessions}-{rep}", sessions,
                                      messages, args.size,
                                      sink if system == "relay+delivery" else None, workers=w)
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
                r = run_relay(base, "relay-profile", levels[-1], counts[-1], args.size, None,
                              profile=(spy, out))
                print(f"\nprofile of a {levels[-1]}-session relay run under py-spy "
                      f"({r.rate:.0f} msg/s while sampled):")
                print(profiling.summarize(out))
    finally:
        if pf is not None:
            pf.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            time.sleep(0.2)
            shutil.rmtree(base, ignore_errors=True)


def describe(r: Result) -> str:
    per = 1000 / max(r.accepted, 1)
    split = ""
    if r.threads is not None:
        split = (f" (event loop thread {r.threads[0] * per:.2f}, other threads "
                 f"{r.threads[1] * per:.2f})")
    e2e = ""
    if r.done_seconds:
        e2e = f", all delivered after {r.done_seconds:.2f}s ({r.end_to_end:.0f} msg/s end to end)"
    return (f"  {r.system:<15} {r.sessions:>3} sessions: {r.rate:7.0f} msg/s accepted "
            f"({r.accepted}/{r.messages} in {r.seconds:.2f}s){e2e}, CPU {r.cpu * per:.2f} ms/msg"
            f"{split}, {r.memory_kind} {r.memory_kb / 1024:.0f} MiB {r.note}")


def summary(results: list[Result]) -> str:
    rows = []
    keys = sorted({(r.sessions, r.system) for r in results},
                  key=lambda k: (k[0], k[1] == "postfix", k[1]))
    for sessions, system in keys:
        rs = [r for r in results if r.sessions == sessions and r.system == system]
        rate = statistics.median(r.rate for r in rs)
        e2e = [r.end_to_end for r in rs if r.end_to_end]
        cpu = statistics.median(1000 * r.cpu / max(r.accepted, 1) for r in rs)
        mem = max(r.memory_kb for r in rs)
        ok = all(r.accepted == r.messages and not r.note for r in rs)
        rows.append([sessions, system, f"{rate:.0f}",
                     f"{statistics.median(e2e):.0f}" if e2e else "-", f"{cpu:.2f}",
                     f"{mem / 1024:.0f} ({rs[0].memory_kind})", len(rs),
                     "yes" if ok else "NO"])
    text = table(["sessions", "system", "accepted msg/s", "end-to-end msg/s", "CPU ms/msg",
                  "peak MiB", "runs", "all ok"], rows) + "\n"

    top = max(r.sessions for r in results)
    postfix = [r.rate for r in results if r.sessions == top and r.system == "postfix"]
    for system in sorted({r.system for r in results if r.system.split()[0] == "relay"}):
        relay = [r.rate for r in results if r.sessions == top and r.system == system]
        if relay and postfix:
            ratio = statistics.median(relay) / statistics.median(postfix)
            text += (f"\n{system}: at {top} session(s) it accepts {ratio:.2f}x Postfix's "
                     "rate")
    return text


if __name__ == "__main__":
    main()
