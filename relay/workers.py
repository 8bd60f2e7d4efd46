"""Intake worker processes (`listener.workers` > 1): the listener on several cores.

One event loop runs the whole intake of a process: past ~1,000 to 1,500 messages a second
it is the limit, while the machine's other cores idle. With `listener.workers = N` the
main process (relay.app) keeps delivery, TLS reporting, MTA-STS refresh, metrics and
health, and starts N worker processes (`python -m relay.workers`), each running the
listener, the intake and a queue writer of its own:

- **One port, N sockets.** The main process binds the listener's address(es) with
  SO_REUSEPORT without listening (this holds the port, also one the kernel chose for
  port 0, while workers come and go); each worker binds the same address and port with
  SO_REUSEPORT and listens: the kernel spreads new connections over the listening
  sockets by a hash of the connection's addresses.
- **One queue.** Each worker commits its own group commits (SQLite: WAL lets one writer
  at a time into the file; the others wait for the lock up to busy_timeout, then go in
  turn; PostgreSQL: a pool each). `250` only after the worker's COMMIT, as ever. The
  main process opens the queue first, so the migration runs once, before any worker.
- **New mail is delivered at once.** Each worker has a socketpair to the main process;
  after a commit that queued mail it sends one byte, and the main process sets the
  store's `new_work` (the scheduler wakes, as for mail accepted in-process). The same
  socket tells a worker that the main process is gone (EOF): it drains and exits.
- **One log.** A worker's stdout is a pipe to the main process, which writes whole
  lines to its own stdout: lines of different processes never mix. Every worker line
  carries `"worker": N`. The main process counts them for /metrics as its own.
- **Life cycle.** `start` waits until every worker listens (`worker_started`), then
  logs `listening`. A worker that dies is logged (`worker_exited`, level error) and
  started again (at once, or after a pause growing to 30 s if it keeps dying young);
  the others keep accepting, and what it had acknowledged is committed. The first
  SIGTERM drains every worker (each finishes its open transactions, as a single
  process does) and the main process returns only after they have exited. Workers
  ignore SIGINT (a Ctrl-C reaches the whole process group: the main process decides).
- **Limits.** `max_connections`, `max_connections_per_ip`, `reserved_connections` and
  `data_memory_limit` are the relay's totals: each worker enforces its share (rounded
  up; the memory share at least twice max_message_size). The AUTH failure throttle is
  kept per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import pickle
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

from relay import log as relay_log
from relay.config import Config, ListenerConfig
from relay.errors import RelayError
from relay.intake.core import Intake, IntakeSettings
from relay.intake.listener import Listener, load_tls, load_users
from relay.log import event
from relay.store import Store, open_store

READY, NEW_MAIL = b"L", b"n"  # worker -> main on the control socket
START_TIMEOUT = 60.0  # seconds a worker may take to listen
YOUNG = 10.0  # a worker that dies sooner than this after its start waits before the next
MAX_PAUSE = 30.0  # longest pause before starting a worker that keeps dying young
KILL_GRACE = 5.0  # seconds past the drain deadline before a worker is killed
PIPE_SIZE = 1 << 20  # octets of a worker's log pipe (F_SETPIPE_SZ)
READ_SIZE = 1 << 16  # octets read from it at a time (below the mmap threshold)


def share(lc: ListenerConfig, workers: int) -> ListenerConfig:
    """One worker's listener settings: the connection limits and the memory budget
    divided among `workers` (rounded up; memory at least twice the largest message)."""
    if workers <= 1:
        return lc
    reserved = lc.reserved_connections
    if reserved is None:
        reserved = lc.max_connections // 5
    total = math.ceil(lc.max_connections / workers)
    return lc.model_copy(update={
        "max_connections": total,
        "max_connections_per_ip": math.ceil(lc.max_connections_per_ip / workers),
        "reserved_connections": min(math.ceil(reserved / workers), max(0, total - 1)),
        "data_memory_limit": max(math.ceil(lc.effective_data_memory_limit / workers),
                                 2 * lc.max_message_size),
    })


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    control: socket.socket | None = None
    ready: asyncio.Future[None] | None = None
    started: float = 0.0
    pause: float = 0.0  # before its next start, if it keeps dying young
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class WorkerPool:
    """N intake worker processes as one app component (relay.app.Component), in place
    of the Listener."""

    name = "listener"

    def __init__(self, cfg: Config, store: Store, workers: int, *,
                 tls: bool, auth: bool) -> None:
        self.cfg = cfg
        self.store = store
        store.tag_ids(0)  # the workers' ids carry their numbers: no two are the same
        self.count = workers
        self.host = cfg.listener.host
        self.port = cfg.listener.port
        self.tls, self.auth = tls, auth
        self.workers = [_Worker(i) for i in range(1, workers + 1)]
        self._held: list[socket.socket] = []  # bound, never listening: the port is ours
        self._stopping = False
        self._failed: asyncio.Future[None] | None = None
        self._open: dict[Any, int] = {}  # worker number -> sessions open (with metrics)

    @property
    def bound(self) -> list[tuple[str, int]]:
        """The listener's addresses while at least one worker listens."""
        if not any(w.ready is not None and w.ready.done() and not w.ready.exception()
                   and w.proc is not None and w.proc.returncode is None
                   for w in self.workers):
            return []
        return [s.getsockname()[:2] for s in self._held]

    # --- the component --------------------------------------------------------------

    async def start(self) -> None:
        self._failed = asyncio.get_running_loop().create_future()
        self._hold_port()
        try:
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except BaseException:
            await self.stop()
            raise
        host, port = self._held[0].getsockname()[:2]
        event("listening", service="smtp", host=host, port=port, tls=self.tls,
              auth=self.auth, workers=self.count)

    async def wait(self) -> None:
        assert self._failed is not None
        await self._failed

    async def drain(self, deadline: float) -> None:
        """SIGTERM to every worker (each drains as a single process does); returns when
        all have exited, or at `deadline` + KILL_GRACE (stop() kills the rest)."""
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        waits = [asyncio.ensure_future(w.proc.wait()) for w in self.workers
                 if w.proc is not None and w.proc.returncode is None]
        if waits:
            await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()) + KILL_GRACE)

    async def stop(self) -> None:
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.proc.wait(), 10)
        for w in self.workers:  # the log readers end at EOF: the last lines are written
            if w.tasks:
                await asyncio.wait(w.tasks, timeout=5)
            for task in w.tasks:
                task.cancel()
            self._close_control(w)
        for sock in self._held:
            sock.close()
        self._held = []

    def kill_now(self) -> None:
        """A second signal: the main process exits at once; so do the workers."""
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()

    # --- the port -------------------------------------------------------------------

    def _hold_port(self) -> None:
        """Bind every address of listener.host (as asyncio's create_server would) with
        SO_REUSEPORT, without listening: port 0 becomes one port for all workers."""
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        seen: set[tuple[Any, ...]] = set()
        port = self.port
        try:
            for family, type_, proto, _, addr in infos:
                key = (family, addr[0])
                if key in seen:
                    continue
                seen.add(key)
                sock = socket.socket(family, type_, proto)
                self._held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                port = sock.getsockname()[1]
        except OSError as exc:
            for sock in self._held:
                sock.close()
            self._held = []
            raise RelayError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self.port = port

    # --- one worker -----------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        log_r, log_w = os.pipe()  # the worker's stdout
        spec = pickle.dumps({"config": self.cfg, "index": w.index, "port": self.port,
                             "control_fd": theirs.fileno(),
                             "log_format": "json", "log_level": self.cfg.log.level})
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.workers", stdin=asyncio.subprocess.PIPE,
                stdout=log_w, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            for fd in (log_r, log_w):
                os.close(fd)
            ours.close()
            theirs.close()
            raise RelayError(f"cannot start intake worker {w.index}: {exc}") from None
        theirs.close()
        os.close(log_w)
        os.set_blocking(log_r, False)
        w.proc, w.control, w.started = proc, ours, loop.time()
        w.ready = loop.create_future()
        assert proc.stdin is not None
        proc.stdin.write(spec)
        proc.stdin.close()
        log_done = loop.create_future()
        loop.add_reader(log_r, self._on_log, log_r, bytearray(), log_done)
        loop.add_reader(ours.fileno(), self._on_control, w)
        w.tasks = [asyncio.ensure_future(log_done),
                   loop.create_task(self._watch(w, proc), name=f"worker-{w.index}")]
        try:
            await asyncio.wait_for(asyncio.shield(w.ready), START_TIMEOUT)
        except TimeoutError:
            raise RelayError(f"intake worker {w.index} did not listen within "
                             f"{START_TIMEOUT:g}s") from None
        event("worker_started", worker=w.index, pid=proc.pid)
        if self._stopping:  # restarted while the relay began to stop: drain it too
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def _on_control(self, w: _Worker) -> None:
        assert w.control is not None
        try:
            data = w.control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; _watch handles it
            self._close_control(w)
            return
        if NEW_MAIL in data:
            self.store.new_work.set()
        if READY in data and w.ready is not None and not w.ready.done():
            w.ready.set_result(None)

    def _close_control(self, w: _Worker) -> None:
        if w.control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(w.control.fileno())
            w.control.close()
            w.control = None

    def _on_log(self, fd: int, rest: bytearray, done: asyncio.Future[None]) -> None:
        """The worker's stdout, whole lines at a time, to the relay's log (EOF: the
        worker has exited; what is left is written, the pipe closed)."""
        try:
            chunk = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
            if rest:
                self._write(bytes(rest) + b"\n")
            if not done.done():
                done.set_result(None)
            return
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            rest += chunk
            return
        if rest:
            self._write(bytes(rest) + chunk[:cut])
            rest.clear()
        else:
            self._write(chunk[:cut])
        rest += chunk[cut:]

    def _write(self, data: bytes) -> None:
        out = relay_log.log
        text = data.decode("utf-8", "replace")
        observers = relay_log.observers
        if out.is_json and not observers:
            out.write_lines(text)
            return
        lines = text.splitlines()
        if out.is_json:
            out.write_lines(text)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if not out.is_json:
                    out.write_lines(line + "\n")
                continue
            if not out.is_json:
                out.write(record)
            name = str(record.get("event", ""))
            fields = {k: v for k, v in record.items() if k not in ("ts", "level", "event")}
            if name in ("connect", "disconnect"):  # sessions open per worker
                worker = fields.get("worker")
                self._open[worker] = self._open.get(worker, 0) + (1 if name == "connect"
                                                                  else -1)
            self._observe(name, fields)

    def _observe(self, name: str, fields: dict[str, Any]) -> None:
        for observer in relay_log.observers:
            with contextlib.suppress(Exception):
                observer(name, fields)

    def _sessions_lost(self, w: _Worker) -> None:
        """A worker died: its open sessions went with it (no `disconnect` lines came):
        the metrics' connection gauge is told so, the log is not."""
        for _ in range(max(0, self._open.pop(w.index, 0))):
            self._observe("disconnect", {"worker": w.index, "reason": "worker exited"})

    async def _watch(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        loop = asyncio.get_running_loop()
        if w.ready is not None and not w.ready.done():
            w.ready.set_exception(RelayError(
                f"intake worker {w.index} exited before it listened ({_status(code)})"))
            w.ready.exception()  # retrieved: the starter raises its own
        fields: dict[str, Any] = {"worker": w.index, "pid": proc.pid, **_status_fields(code)}
        if w.tasks:  # its last lines first (the pipe's EOF)
            await asyncio.wait([w.tasks[0]], timeout=5)
        self._sessions_lost(w)
        if self._stopping:
            event("worker_exited", **fields)
            return
        lived = loop.time() - w.started
        w.pause = 0.0 if lived >= YOUNG else min(MAX_PAUSE, max(1.0, w.pause * 2))
        event("worker_exited", level="error", restart_in=w.pause, **fields)
        if w.pause:
            await asyncio.sleep(w.pause)
        if self._stopping:
            return
        self._close_control(w)
        try:
            await self._spawn(w)
        except RelayError as exc:
            event("internal_error", level="error", component=self.name, worker=w.index,
                  error=str(exc))
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()


def _status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


def _status_fields(code: int) -> dict[str, Any]:
    if code < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-code).name}
        return {"signal": -code}
    return {"code": code}


# --- the worker process ----------------------------------------------------------------


async def _run_worker(cfg: Config, index: int, port: int, control: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    lc = cfg.listener
    workers = cfg.listener.effective_workers
    tls: ssl.SSLContext | None = load_tls(lc)
    users = load_users(lc, tls)
    store = await open_store(cfg.queue, check=False, create=False, write_turns=True)
    store.tag_ids(index)  # the main process makes its ids (NDRs) with tag 0
    stop = asyncio.Event()
    try:
        hostname = lc.hostname or socket.getfqdn()
        intake = Intake(IntakeSettings.from_config(share(lc, workers), hostname,
                                                   postmaster=cfg.ndr.postmaster),
                        store, tls_context=tls, users=users)
        listener = Listener(intake, lc.host, port, reuse_port=True, announce=False)
        await listener.start()
        control.setblocking(False)
        await loop.sock_sendall(control, READY)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        async def notify() -> None:  # a commit that queued mail wakes the scheduler
            try:
                while True:
                    await store.new_work.wait()
                    store.new_work.clear()
                    await loop.sock_sendall(control, NEW_MAIL)
            except OSError:  # the main process is gone
                stop.set()

        async def main_gone() -> None:
            """EOF, or ECONNRESET (it died with our bytes unread): drain and exit."""
            try:
                while await loop.sock_recv(control, 64):
                    pass
            except OSError:
                pass
            stop.set()

        tasks = [loop.create_task(notify()), loop.create_task(main_gone())]
        await stop.wait()
        await listener.drain(loop.time() + lc.drain_timeout)
        await listener.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()
    if store.new_work.is_set():  # the last commits of the drain
        with contextlib.suppress(OSError):
            control.setblocking(True)
            control.send(NEW_MAIL)
    return 0


def main() -> int:
    spec = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    cfg: Config = spec["config"]
    index = int(spec["index"])
    relay_log.configure(fmt=spec["log_format"], level=spec["log_level"],
                        extra={"worker": index}, coalesce=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # room for bursts of log lines
        fcntl.fcntl(sys.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    control = socket.socket(fileno=int(spec["control_fd"]))
    try:
        return asyncio.run(_run_worker(cfg, index, int(spec["port"]), control))
    except Exception as exc:
        fields: dict[str, Any] = {}
        if not isinstance(exc, RelayError):
            import traceback

            fields["traceback"] = "".join(traceback.format_exception(exc)).rstrip()
        message = str(exc) if isinstance(exc, RelayError) else f"{type(exc).__name__}: {exc}"
        event("fatal", level="error", error=message, exit=1, **fields)
        return 1
    finally:
        relay_log.log.flush()
        control.close()


if __name__ == "__main__":
    sys.exit(main())
