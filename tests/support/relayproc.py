"""Run `relay serve` as a real subprocess for integration and e2e tests.

    with start_relay(tmp_path, listener={"max_recipients": 5}) as relay:
        with relay.smtp() as client:            # smtplib.SMTP, connected
            client.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        assert relay.queue_ids() == [...]

Every relay gets its own folder (config file, queue database, captured output) and a
free port: the config says `port = 0` and the real port is read from the relay's
`listening` log event, so parallel test runs never collide. The log (JSON lines on
stdout) is parsed by a reader thread; tests wait for events instead of sleeping.
Processes are stopped by PID (SIGTERM, then SIGKILL) when the context ends.

Defaults written to the config (deep-merged with the overrides you pass):
listener on 127.0.0.1, `hostname = "relay.test"`, `allowed_networks = ["127.0.0.1/32"]`
(so a client bound to 127.0.0.2 is *not* allowed), queue in `<workdir>/queue/relay.db`,
`delivery.enabled = false` (no delivery attempts unless a test turns it on), JSON log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NOT_ALLOWED_IP = "127.0.0.2"  # a loopback source outside the default allowed_networks
LOOPBACK_NO_DNS = "127.0.0.1:9"  # nothing answers DNS there (discard port, closed)


# --- a small TOML writer (enough for the relay's config) ---------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Tables of scalars/lists, nested tables (`[domains."x"]`) and arrays of tables."""
    out: list[str] = []

    def table(prefix: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not _is_table(v) and not _is_tables(v)}
        if prefix and (scalars or not values):
            out.append(f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{json.dumps(k)} = {_toml_value(v)}")
        for k, v in values.items():
            name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
            if _is_table(v):
                table(name, v)
            elif _is_tables(v):
                for item in v:
                    out.append(f"[[{name}]]")
                    for ik, iv in item.items():
                        out.append(f"{json.dumps(ik)} = {_toml_value(iv)}")

    table("", data)
    return "\n".join(out) + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, Mapping)


def _is_tables(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(i, Mapping) for i in v)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def default_config(workdir: Path) -> dict[str, Any]:
    return {
        "listener": {"host": "127.0.0.1", "port": 0, "hostname": "relay.test",
                     "allowed_networks": ["127.0.0.1/32"]},
        "queue": {"path": str(workdir / "queue" / "relay.db")},
        # Tests never ask the machine's own resolver: the start-up probe goes to a closed
        # loopback port (tests that resolve use the DNSSEC test bed's Unbound).
        "dns": {"nameservers": [LOOPBACK_NO_DNS], "timeout": "1s"},
        "delivery": {"enabled": False},
        "log": {"format": "json", "level": "info"},
    }


# --- the process -----------------------------------------------------------------------


class RelayProc:
    """One relay's folder, config and (current) process. See the module docstring."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], *,
                 env: Mapping[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = dict(config)
        self.config_path = self.workdir / "relay.toml"
        self.extra_env = dict(env or {})
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path: Path | None = None
        self.port = 0
        self.runs = 0
        self.lines: list[str] = []  # raw stdout lines of every run
        self.events_all: list[dict[str, Any]] = []  # parsed JSON events; "_run" = run number
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.write_config()

    # config -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self.config.get("listener", {}).get("host", "127.0.0.1"))

    @property
    def db_path(self) -> Path:
        return Path(self.config["queue"]["path"])

    def write_config(self, **sections: Mapping[str, Any]) -> None:
        """Merge `sections` into the config and write the file (takes effect on start)."""
        self.config = deep_merge(self.config, sections)
        self.config_path.write_text(toml_dumps(self.config), encoding="utf-8")

    # life cycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path),
                *self.args]

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> RelayProc:
        """Launch `relay serve`; with `wait`, return once it logged `listening`."""
        if self.running:
            raise RuntimeError("relay already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(self.extra_env)
        self.runs += 1
        mark = self.mark()
        self.stderr_path = self.workdir / f"stderr.{self.runs}.txt"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, args=(self.proc, self.runs),
                                        daemon=True)
        self._reader.start()
        if wait:
            ev = self.wait_event("listening", timeout=timeout, after=mark, service="smtp")
            self.port = int(ev["port"])
        return self

    def _read(self, proc: subprocess.Popen[bytes], run: int) -> None:
        assert proc.stdout is not None
        with open(self.workdir / "stdout.txt", "ab") as tee:
            for raw in proc.stdout:
                tee.write(raw)
                tee.flush()
                line = raw.decode("utf-8", "replace").rstrip("\n")
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                with self._cond:
                    self.lines.append(line)
                    if isinstance(ev, dict):
                        ev["_run"] = run
                        self.events_all.append(ev)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL (`kill -9`) and reap."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.wait_exit(10)

    def restart(self, *, keep_port: bool = False, timeout: float = 20.0) -> RelayProc:
        """Start again on the same folder and queue (after stop() or kill()).

        `keep_port`: listen on the previous port (it may, rarely, be taken meanwhile);
        by default the new run gets a fresh free port (read `relay.port` again).
        """
        if self.running:
            self.stop()
        if keep_port and self.port:
            self.write_config(listener={"port": self.port})
        self.start(timeout=timeout)
        if keep_port:
            self.write_config(listener={"port": 0})
        return self

    # log --------------------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the event list: pass it as `after=` to see only later events.

        The log is read by a thread, so an event the relay wrote just before may still
        land after the mark; to tie events to one connection use `session_for`.
        """
        with self._cond:
            return len(self.events_all)

    def session_for(self, client: Any, *, timeout: float = 10.0) -> str:
        """The relay's session id of a client connection (a Dialog, an smtplib.SMTP,
        a socket or its local port), from the `connect` event's client_port."""
        sock = getattr(client, "sock", client)
        port = sock if isinstance(sock, int) else sock.getsockname()[1]
        return str(self.wait_event("connect", timeout=timeout, client_port=port)["session"])

    def events(self, name: str | None = None, *, after: int = 0,
               **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            evs = list(self.events_all[after:])
        return [e for e in evs if (name is None or e.get("event") == name)
                and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, name: str, *, timeout: float = 10.0, after: int = 0,
                   **match: Any) -> dict[str, Any]:
        """The first event `name` (after `after`) whose fields equal `match`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events_all[after:]:
                    if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                        return ev
                left = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if left <= 0 or (exited and not (self._reader and self._reader.is_alive())):
                    raise AssertionError(
                        f"no {name!r} event {match or ''} within {timeout}s "
                        f"(exit status {self.proc.poll() if self.proc else None});\n"
                        f"stderr: {self.stderr_text()[-2000:]}\nlog tail:\n"
                        + "\n".join(self.lines[-20:]))
                self._cond.wait(min(left, 0.5))

    def wait_line(self, needle: str, *, timeout: float = 10.0, after: int = 0) -> str:
        """The first raw stdout line (index >= `after`) containing `needle` (any log format)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                                 and not (self._reader and self._reader.is_alive())):
                    raise AssertionError(f"no line with {needle!r} within {timeout}s; "
                                         f"stderr: {self.stderr_text()[-2000:]}")
                self._cond.wait(min(left, 0.5))

    async def await_event(self, name: str, *, within: float = 10.0, after: int = 0,
                          **match: Any) -> dict[str, Any]:
        """`wait_event` for async tests (does not block the event loop)."""
        return await asyncio.to_thread(self.wait_event, name, timeout=within, after=after,
                                       **match)

    def stderr_text(self) -> str:
        path = self.stderr_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    # clients ----------------------------------------------------------------------------

    def smtp(self, *, source: str | None = None, timeout: float = 10.0) -> smtplib.SMTP:
        """An smtplib client connected to the relay (from `source` IP when given)."""
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test",
                            timeout=timeout, source_address=(source, 0) if source else None)

    def swaks(self, *args: str, source: str | None = None,
              timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run swaks against the relay; `args` are extra swaks options."""
        cmd = ["swaks", "--server", f"{self.host}:{self.port}", "--helo", "client.test",
               "--timeout", "10"]
        if source:
            cmd += ["--local-interface", source]
        return subprocess.run([*cmd, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    # queue ------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`relay <args> -c <config>` (e.g. cli("queue", "list", "--json"))."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return subprocess.run([sys.executable, "-m", "relay", *args, "-c",
                               str(self.config_path)], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def queue_list(self, *, all: bool = True) -> list[dict[str, Any]]:
        """`relay queue list [--all] --json` parsed."""
        args = ["queue", "list", "--json"] + (["--all"] if all else [])
        return json.loads(self.cli(*args).stdout)

    def db(self) -> sqlite3.Connection:
        """A read-only connection to the queue database (close it when done)."""
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)

    def messages(self) -> dict[str, tuple[str, bytes | None]]:
        """{queue id: (sender, stored body)} read straight from the database."""
        if not self.db_path.exists():
            return {}
        with contextlib.closing(self.db()) as conn:
            return {row[0]: (row[1], row[2])
                    for row in conn.execute("SELECT id, sender, body FROM messages")}

    def queue_ids(self) -> list[str]:
        return sorted(self.messages())

    def recipients(self, queue_id: str) -> list[str]:
        with contextlib.closing(self.db()) as conn:
            return [r[0] for r in conn.execute(
                "SELECT address FROM recipients WHERE message_id = ? ORDER BY id", (queue_id,))]


@contextlib.contextmanager
def start_relay(workdir: Path, *, env: Mapping[str, str] | None = None,
                args: tuple[str, ...] = (), start: bool = True,
                **sections: Mapping[str, Any]) -> Iterator[RelayProc]:
    """A RelayProc with `default_config` merged with `sections` (e.g. listener={...});
    started (unless start=False) and always stopped at the end."""
    relay = RelayProc(workdir, deep_merge(default_config(Path(workdir)), sections),
                      env=env, args=args)
    try:
        if start:
            relay.start()
        yield relay
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop(timeout=15)


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """(the Received: field the relay prepended, the message exactly as the client sent it).

    Raises AssertionError when the stored body does not start with exactly one
    Received: field: the honest check for "the body is what the client sent".
    """
    assert stored.startswith(b"Received: "), stored[:80]
    end = 0
    while True:
        nl = stored.index(b"\r\n", end)
        end = nl + 2
        if stored[end:end + 1] not in (b" ", b"\t"):
            return stored[:end], stored[end:]


# --- a raw SMTP dialogue (for what smtplib normalizes away) -------------------------------


class Dialog:
    """A line-level SMTP client on a plain socket: send exact bytes, read whole replies.

        with Dialog(relay.host, relay.port, source="127.0.0.2") as d:
            assert d.greeting[0] == 220
            code, lines = d.cmd("EHLO client.test")
    """

    def __init__(self, host: str, port: int, *, source: str | None = None,
                 timeout: float = 10.0) -> None:
        import socket

        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self._buf = b""
        self.greeting = self.reply()

    def __enter__(self) -> Dialog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: (code, [text of each line])."""
        lines: list[str] = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        """Send one command (CRLF added) and read its reply."""
        raw = line.encode("utf-8") if isinstance(line, str) else line
        self.send(raw + b"\r\n")
        return self.reply()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buf += chunk
        except TimeoutError:
            return False
        except OSError:
            return True

    def starttls(self, context: Any, server_hostname: str = "relay.test") -> None:
        """Wrap the socket in TLS (after a 220 to STARTTLS); drops any buffered bytes."""
        self._buf = b""
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
