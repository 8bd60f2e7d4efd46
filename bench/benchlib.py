"""Shared parts of the benchmarks (not tests): processes, CPU and memory, smtp-source, tables.

- `RelayServer`: `relay serve` as a subprocess whose JSON log goes to a file (nothing
  parses it while the load runs, so the benchmark process does not steal CPU from the
  relay); the port is read from the `listening` event.
- `cpu_seconds(pid)`, `cpu_tree(pid)`, `vm_hwm(pid)`, `pss_tree(pid)`: /proc readings.
  `cpu_tree` counts a process, its reaped children (cutime/cstime) and its live
  descendants, which is how a multi-process MTA such as Postfix is charged.
- `PeakSampler`: a thread sampling a reading (e.g. the PSS of Postfix's processes).
- `smtp_source(...)`: Postfix's load generator, timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.dnsprocs import free_port, random_addr  # noqa: E402
from tests.support.relayproc import deep_merge, toml_dumps  # noqa: E402

__all__ = [
    "ROOT", "LineCounter", "PeakSampler", "RelayServer", "SourceRun", "cpu_seconds",
    "cpu_tree", "free_port", "machine", "pss_tree", "random_addr", "require_tools",
    "smtp_source", "split_threads", "table", "thread_cpu", "vm_hwm", "wait_for",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime+stime of `pid` (all threads); with `children`, plus its reaped children."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime (fields 16, 17)
    return ticks / CLK_TCK


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread id (the main thread's id is `pid`)."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                raw = (task / "stat").read_text()
                f = raw[raw.rindex(")") + 2:].split()
                out[int(task.name)] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def split_threads(pid: int, before: dict[int, float], after: dict[int, float]
                  ) -> tuple[float, float]:
    """(main thread CPU, CPU of all other threads) between two `thread_cpu` readings.
    Threads that ended in between are lost (aiosqlite's threads live as long as the store)."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    other = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
    return main, other


def children_of(pid: int) -> list[int]:
    """Direct children (from /proc/PID/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        for c in children_of(p):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def cpu_tree(pid: int) -> float:
    """CPU of `pid` with its reaped children, plus its live descendants."""
    total = cpu_seconds(pid, children=True)
    for d in descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(d)
    return total


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def vm_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) in KiB."""
    return _status_kb(pid, "VmHWM")


def pss_tree(pid: int) -> int:
    """Proportional set size (KiB) of `pid` and its descendants: shared pages counted once."""
    total = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


class PeakSampler:
    """Samples `reading()` every `interval` seconds in a thread; `.peak` is the largest."""

    def __init__(self, reading: Callable[[], int], interval: float = 0.2) -> None:
        self.reading = reading
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.reading())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self.reading())


# --- tools --------------------------------------------------------------------------------


def require_tools(*names: str) -> None:
    missing = [n for n in names if not (shutil.which(n) or shutil.which(n, path="/usr/sbin"))]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (see bench/README.md: apt-get install "
                 f"postfix; cc and libssl-dev for the TLS sink)")


def tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin") or name


@dataclass
class SourceRun:
    seconds: float
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def smtp_source(host: str, port: int, *, sessions: int, messages: int, size: int,
                sender: str = "from@x.test", rcpt: str = "to@y.test",
                timeout: float = 300.0) -> SourceRun:
    """`smtp-source -s SESSIONS -m MESSAGES -l SIZE -f FROM -t TO HOST:PORT`, one message
    per connection (no -d); exits non-zero at the first reply that is not positive."""
    cmd = [tool("smtp-source"), "-4", "-s", str(sessions), "-m", str(messages), "-l",
           str(size), "-M", "client.bench.test", "-f", sender, "-t", rcpt, f"{host}:{port}"]
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -1, f"timed out after {timeout}s: {exc.stderr!r}"
    return SourceRun(time.monotonic() - began, code, out.strip())


# --- the relay ----------------------------------------------------------------------------


def relay_config(workdir: Path, host: str, **sections: Mapping[str, Any]) -> dict[str, Any]:
    base = {
        "listener": {"host": host, "port": 0, "hostname": "relay.bench.test",
                     "allowed_networks": ["127.0.0.0/8"],
                     # smtp-source reconnects at once: the per-IP count must not trip 421
                     "max_connections": 2000, "max_connections_per_ip": 2000},
        "queue": {"path": str(workdir / "queue" / "relay.db")},
        "delivery": {"enabled": False},
        "log": {"format": "json", "level": "info"},
    }
    return deep_merge(base, sections)


class RelayServer:
    """`relay serve -c DIR/relay.toml` with its log in DIR/log.N.jsonl."""

    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.config_path = self.dir / "relay.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.runs = 0
        self.log_path = self.dir / "log.0.jsonl"
        self.listening_at = 0.0  # time.time() of the `listening` event

    @property
    def host(self) -> str:
        return str(self.config["listener"]["host"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def update(self, **sections: Mapping[str, Any]) -> None:
        self.config = deep_merge(self.config, sections)

    def start(self, timeout: float = 30.0) -> RelayServer:
        self.config_path.write_text(toml_dumps(self.config), encoding="utf-8")
        self.runs += 1
        self.log_path = self.dir / f"log.{self.runs}.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        with open(self.log_path, "wb") as out, open(self.dir / "stderr.txt", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events("listening"):
                if ev.get("service") == "smtp":
                    self.port = int(ev["port"])
                    self.listening_at = _ts(ev["ts"])
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        err_text = (self.dir / "stderr.txt").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"relay did not start: {err_text}")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if name is not None and f'"{name}"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if name is None or ev.get("event") == name:
                        out.append(ev)
        return out

    def count(self, name: str) -> int:
        needle = f'"event": "{name}"'
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace").count(needle)
        return 0

    def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return subprocess.run([sys.executable, "-m", "relay", *args, "-c",
                               str(self.config_path)], cwd=self.dir, env=env,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _ts(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class LineCounter:
    """Counts lines containing `needle` in a growing log file, reading only what is new."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path = path
        self.needle = needle.encode()
        self.offset = 0
        self.rest = b""
        self.total = 0

    def count(self) -> int:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset += len(chunk)
            data = self.rest + chunk
            cut = data.rfind(b"\n") + 1
            self.rest = data[cut:]
            self.total += sum(1 for line in data[:cut].split(b"\n") if self.needle in line)
        return self.total


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


# --- output -------------------------------------------------------------------------------


def machine() -> str:
    """Date, CPUs, OS, Python and the load average: the context a figure needs."""
    import datetime as dt
    import platform

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{dt.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
            f"{platform.platform()}, Python {platform.python_version()}, load average {load}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                               for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace(",", "").isdigit()
