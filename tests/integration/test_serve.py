"""`relay serve` as a process: start-up checks, log, signals, drain, `relay passwd`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay import app as app_module
from relay.app import App
from relay.intake.auth import verify_password
from tests.support import certs
from tests.support.relayproc import Dialog, RelayProc, deep_merge, default_config, start_relay


def _run_serve(tmp_path: Path, **sections: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """Start a relay that is expected to refuse to start; returns the finished process."""
    relay = RelayProc(tmp_path, deep_merge(default_config(tmp_path), sections))
    return subprocess.run(relay.command(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def _fatal(result: subprocess.CompletedProcess[str]) -> str:
    """The error of the one `fatal` event a relay that could not start logged (on stdout,
    like its other events; nothing on stderr, no traceback)."""
    assert result.stderr == "", result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    fatal = [e for e in events if e["event"] == "fatal"]
    assert len(fatal) == 1 and events[-1] is fatal[0], events
    assert fatal[0]["level"] == "error" and fatal[0]["exit"] == result.returncode
    return str(fatal[0]["error"])


def test_start_logs_starting_and_listening_then_stops_cleanly(tmp_path: Path) -> None:
    with start_relay(tmp_path) as relay:
        starting, listening = relay.events()[:2]
        assert starting["event"] == "starting" and starting["pid"] == relay.pid
        assert starting["config"] == str(relay.config_path)
        assert listening["event"] == "listening"
        assert (listening["host"], listening["port"]) == ("127.0.0.1", relay.port)
        with relay.smtp() as c:
            assert c.noop()[0] == 250
        assert relay.stop() == 0
    names = [e["event"] for e in relay.events()]
    assert names[-2:] == ["draining", "stopped"]
    assert relay.events("stopped")[0]["code"] == 0


def test_sigterm_lets_the_open_transaction_finish(tmp_path: Path) -> None:
    with start_relay(tmp_path) as relay:
        idle = Dialog(relay.host, relay.port)
        assert idle.cmd("EHLO idle.test")[0] == 250
        busy = Dialog(relay.host, relay.port)
        busy.cmd("EHLO busy.test")
        busy.cmd("MAIL FROM:<a@example.org>")
        busy.cmd("RCPT TO:<b@example.com>")
        assert busy.cmd("DATA")[0] == 354
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        mark = relay.mark()
        relay.send_signal(signal.SIGTERM)
        relay.wait_event("draining", after=mark)
        # an idle session is told and closed; a new session is refused
        code, text = idle.reply()
        assert code == 421 and text[0].startswith("4.3.2")
        assert idle.closed_by_peer()
        with Dialog(relay.host, relay.port) as late:
            assert late.greeting[0] == 421 and late.greeting[1][0].startswith("4.3.2")
        # the open transaction completes and is answered only after its commit
        code, text = busy.cmd(b"second half\r\n.")
        assert code == 250 and "queued as" in text[0], text
        qid = text[0].rsplit(" ", 1)[1]
        code, text = busy.cmd("MAIL FROM:<a@example.org>")  # no new transaction
        assert code == 421 and text[0].startswith("4.3.2")
        assert relay.wait_exit(30) == 0
        idle.close()
        busy.close()
    names = [e["event"] for e in relay.events(after=mark)]
    assert names.index("draining") < names.index("received") < names.index("stopped")
    assert names[-1] == "stopped"
    assert [m["id"] for m in relay.queue_list()] == [qid]


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    with start_relay(tmp_path) as relay:
        stuck = Dialog(relay.host, relay.port)
        stuck.cmd("EHLO stuck.test")
        stuck.cmd("MAIL FROM:<a@example.org>")  # a transaction that never ends
        mark = relay.mark()
        relay.send_signal(signal.SIGTERM)
        relay.wait_event("draining", after=mark)
        start = time.monotonic()
        relay.send_signal(signal.SIGINT)
        assert relay.wait_exit(10) == 1
        assert time.monotonic() - start < 5
        assert relay.events("stopped", after=mark)[-1]["forced"] is True
        stuck.close()


def test_drain_wait_is_bounded(tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={"data_timeout": "2s"}) as relay:
        stuck = Dialog(relay.host, relay.port)
        stuck.cmd("EHLO stuck.test")
        stuck.cmd("MAIL FROM:<a@example.org>")
        relay.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert relay.wait_exit(20) == 0
        assert 1.5 < time.monotonic() - start < 10
        assert stuck.closed_by_peer()
        stuck.close()


def test_log_format_text(tmp_path: Path) -> None:
    with start_relay(tmp_path, args=("--log-format", "text"), start=False) as relay:
        relay.start(wait=False)
        line = relay.wait_line("listening")
        assert not line.startswith("{") and "port=" in line
        assert relay.events() == []  # nothing is JSON
        assert relay.stop() == 0


def test_config_errors_exit_2(tmp_path: Path) -> None:
    bad = _run_serve(tmp_path / "a", listener={"no_such_key": 1})
    assert bad.returncode == 2
    assert "listener.no_such_key" in _fatal(bad) and "relay.toml" in _fatal(bad)
    missing = subprocess.run([sys.executable, "-m", "relay", "serve", "-c",
                              str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in _fatal(missing)
    no_key = _run_serve(tmp_path / "b", listener={"tls_cert": str(tmp_path / "x.pem")})
    assert no_key.returncode == 2 and "tls_key" in _fatal(no_key)
    unreadable = _run_serve(tmp_path / "c", listener={"tls_cert": str(tmp_path / "x.pem"),
                                                      "tls_key": str(tmp_path / "x.key")})
    assert unreadable.returncode == 2 and "listener.tls_cert" in _fatal(unreadable)


def test_users_file_errors_exit_2(tmp_path: Path) -> None:
    leaf = certs.make_leaf(["relay.test"])
    cert, key = certs.write_pair(leaf, directory=tmp_path)
    users = tmp_path / "users"
    users.write_text("bob:plaintext-password\n")
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    plain = _run_serve(tmp_path / "a", listener={**tls, "users_file": str(users)})
    assert plain.returncode == 2
    assert "plaintext passwords are not accepted" in _fatal(plain)
    assert "plaintext-password" not in plain.stdout + plain.stderr
    no_tls = _run_serve(tmp_path / "b", listener={"users_file": str(users)})
    assert no_tls.returncode == 2 and "AUTH is only offered after STARTTLS" in _fatal(no_tls)


def test_corrupt_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "queue" / "relay.db"
    db.parent.mkdir(parents=True)
    garbage = b"this is not a database" * 200
    db.write_bytes(garbage)
    result = _run_serve(tmp_path)
    assert result.returncode == 1
    assert "corrupt" in _fatal(result) and str(db) in _fatal(result)
    assert db.read_bytes() == garbage
    assert [json.loads(ln)["event"] for ln in result.stdout.splitlines()] == [
        "starting", "fatal"]


def test_damage_found_after_an_unclean_stop_stops_the_relay_and_refuses_the_file(
        tmp_path: Path) -> None:
    """Issue 14: the integrity check runs after an unclean stop, in the background: the
    relay listens at once; when the check finds the file damaged it stops (exit 1),
    and the next start refuses the file before listening."""
    from relay.model import Envelope
    from relay.store import Store
    from relay.store.sqlite.runstate import marker_path

    relay = RelayProc(tmp_path, default_config(tmp_path))
    db = relay.db_path

    async def fill() -> None:
        store = await Store.open(db, check="auto")
        await asyncio.gather(*(store.enqueue(Envelope("a@example.org", (f"r{i}@x.example",),
                                                      b"Subject: t\r\n\r\nx\r\n"), now=1.0)
                               for i in range(30)))
        await store.close()

    asyncio.run(fill())
    import sqlite3

    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'recipients'"
                           ).fetchone()
    conn.close()
    with db.open("r+b") as f:  # a damaged page, as a power cut may leave one
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)
    state = json.loads(marker_path(db).read_text())
    marker_path(db).write_text(json.dumps({**state, "state": "running"}))  # unclean stop
    relay.start()  # listening: the check does not hold the listener
    assert relay.wait_exit(30) == 1
    damaged = relay.wait_event("integrity_check", result="damaged")
    assert damaged["level"] == "error" and damaged["path"] == str(db)
    assert damaged["reason"] == "unclean stop"
    names = [e["event"] + str(e.get("result", "")) for e in relay.events()]
    assert names.index("integrity_checkstarted") < names.index("listening")
    assert relay.events("draining")[0]["level"] == "error"
    assert relay.events("stopped")[-1]["code"] == 1
    again = _run_serve(tmp_path)
    assert again.returncode == 1
    assert "corrupt" in _fatal(again) and "quick_check" in _fatal(again)


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_serve(tmp_path, listener={"port": port})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in _fatal(result)


def test_passwd_prints_a_verifiable_scrypt_line() -> None:
    out = subprocess.run([sys.executable, "-m", "relay", "passwd", "dave"],
                         input="pässword\n", capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    user, _, encoded = out.stdout.strip().partition(":")
    assert user == "dave" and encoded.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verify_password("pässword".encode(), encoded)
    assert not verify_password(b"password", encoded)
    again = subprocess.run([sys.executable, "-m", "relay", "passwd", "dave", "-c",
                            str(Path(__file__).resolve().parents[2] / "config/relay.toml")],
                           input="pässword\n", capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert again.stdout != out.stdout  # a fresh salt every time
    bad = subprocess.run([sys.executable, "-m", "relay", "passwd", "a:b"], input="x\n",
                         capture_output=True, text=True)
    assert bad.returncode == 2
    empty = subprocess.run([sys.executable, "-m", "relay", "passwd", "e"], input="\n",
                           capture_output=True, text=True)
    assert empty.returncode == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_relay_stops_on_either_signal(tmp_path: Path, sig: int) -> None:
    with start_relay(tmp_path) as relay:
        relay.send_signal(sig)
        assert relay.wait_exit(15) == 0
        assert relay.events("draining")[0]["reason"] == signal.Signals(sig).name


# --- the App's component life cycle, in-process with recording components ----------------


class Recorder:
    def __init__(self, name: str, log: list[str], *, dies: bool = False,
                 swallow_first_cancel: bool = False) -> None:
        self.name, self.log, self.dies = name, log, dies
        self.swallow = swallow_first_cancel
        self.deadline: float | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        self.started.set()

    async def wait(self) -> None:
        if self.dies:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        self.deadline = deadline
        self.log.append(f"drain {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.swallow:  # the bug guarded against: a background task loses one cancel
            inner = asyncio.create_task(self._swallowing())
            await asyncio.sleep(0)
            inner.cancel()
            await inner

    async def _swallowing(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        await asyncio.Event().wait()


async def test_app_starts_in_order_drains_and_stops_in_reverse() -> None:
    log: list[str] = []
    a, b = Recorder("a", log), Recorder("b", log)
    app = App([a, b], drain_timeout=7)
    runner = asyncio.create_task(app.run())
    await b.started.wait()
    app.request_stop("test")
    assert await runner == 0
    assert log == ["start a", "start b", "drain a", "drain b", "stop b", "stop a"]
    assert a.deadline == b.deadline
    assert a.deadline is not None
    assert 6 < a.deadline - asyncio.get_running_loop().time() <= 7


async def test_a_component_that_dies_stops_the_app_with_1() -> None:
    log: list[str] = []
    assert await App([Recorder("a", log), Recorder("b", log, dies=True)]).run() == 1
    assert log[-2:] == ["stop b", "stop a"]


async def test_a_stop_that_loses_its_cancellation_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "STOP_TIMEOUT", 0.2)
    log: list[str] = []
    stuck = Recorder("stuck", log, swallow_first_cancel=True)
    app = App([Recorder("a", log), stuck])
    runner = asyncio.create_task(app.run())
    await stuck.started.wait()
    app.request_stop("test")
    assert await asyncio.wait_for(runner, 5) == 0
    assert log[-2:] == ["stop stuck", "stop a"]
